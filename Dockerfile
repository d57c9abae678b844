# docker build -t claude-code-proxy .
# docker run --rm -p 8082:8082 -e OPENAI_API_KEY=sk-... claude-code-proxy
FROM python:3.13-slim
WORKDIR /app
COPY claude_proxy.py .
# Inside a container the proxy must listen on every interface; publish the port with -p.
ENV HOST=0.0.0.0 PORT=8082 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8082
USER nobody
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8082'), timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["python3", "claude_proxy.py"]
