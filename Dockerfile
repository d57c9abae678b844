# docker build -t claude-code-proxy . && docker run --rm -p 8082:8082 -e OPENAI_API_KEY=sk-... claude-code-proxy
FROM python:3.13-slim
WORKDIR /app
COPY claude_proxy.py .
ENV HOST=0.0.0.0 PORT=8082 PYTHONUNBUFFERED=1
EXPOSE 8082
USER nobody
CMD ["python3", "claude_proxy.py"]
