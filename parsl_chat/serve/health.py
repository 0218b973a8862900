"""Probes of a model server's URL: is the port open, is the model loaded; and a free port to start one on."""

from __future__ import annotations

import socket

import httpx

__all__ = ["accepts_connections", "free_port", "past_loading", "url_host"]


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def url_host(host: str) -> str:
    # a server bound to every interface is reached locally through loopback
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def past_loading(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a server that accepts connections has loaded its model. llama-server binds its
    port first and answers every path with HTTP 503 "Loading model" until then; /health
    answers at once otherwise (404 from servers without it, such as llama_cpp.server)."""
    health = httpx.URL(url).copy_with(path="/health", query=None)
    try:
        with httpx.Client(trust_env=False, timeout=timeout_s) as client:
            return client.get(health).status_code != 503
    except httpx.HTTPError:
        return False


def accepts_connections(url: str, timeout_s: float = 2.0) -> bool:
    # a TCP connect, not the readiness GET: llama_cpp.server answers /v1/models only
    # after the generations queued before it, so a busy server would look dead
    parsed = httpx.URL(url)
    try:
        with socket.create_connection((parsed.host, parsed.port or 80), timeout=timeout_s):
            return True
    except OSError:
        return False
