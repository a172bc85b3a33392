# One image for every snpemu service; docker-compose.yml picks the process with `command`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/snpemu \
    PATH=/opt/snpemu/bin:$PATH \
    SNPEMU_CONFIG=/app/.env \
    SNPEMU_BIND=0.0.0.0

WORKDIR /app
# Debian's OVMF is kvm's default guest firmware (/usr/share/OVMF/OVMF_CODE.fd); a base image
# that has it already (the compose test's, built offline) needs no download
RUN [ -f /usr/share/OVMF/OVMF_CODE.fd ] \
 || (apt-get update \
     && apt-get install -y --no-install-recommends ovmf \
     && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/snpemu
COPY pyproject.toml README.md .env ./
COPY services ./services
# wheelhouse/ holds only its README in a checkout, and pip downloads from PyPI. With wheels in
# it (from `pip download`, as the compose test does), the image builds with no network.
COPY wheelhouse/ /tmp/wheelhouse/
RUN if ls /tmp/wheelhouse/*.whl >/dev/null 2>&1; then \
      pip install --no-cache-dir --no-index --find-links /tmp/wheelhouse . ; \
    else \
      pip install --no-cache-dir . ; \
    fi \
 && rm -rf /tmp/wheelhouse \
 && useradd --system --uid 10001 --home-dir /var/lib/snpemu --create-home snpemu

USER snpemu
# Overridden per service in docker-compose.yml; alone, the image runs the RMP service.
CMD ["python", "-m", "snpemu.rmp"]
