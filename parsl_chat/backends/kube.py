"""Kubernetes: Parsl's KubernetesProvider built from a profile, and pod cleanup.

Each Parsl block is one pod running ``process_worker_pool.py``. On top of
Parsl's provider this module adds what a batch tool needs:

* the cluster is chosen explicitly (profile ``kubeconfig``/``context``, else
  ``$KUBECONFIG`` as it is *now*, else ``~/.kube/config``, else the in-cluster
  service account) and probed before Parsl starts, so a dead cluster is a
  one-line error in seconds rather than a BadStateException minutes later;
* pods carry the run id (name prefix and label), so a later ``cleanup`` can
  find them without the driver;
* the pod spec gets what Parsl's provider has no option for: image pull
  policy, node selector, ``restartPolicy: Never``, exact resource quantities,
  and the downward-API variables ``PARSL_CHAT_POD_NAME``/``PARSL_CHAT_POD_NODE``
  that fill the ``job_id`` and ``node`` result columns;
* a pod stuck on its image (``ImagePullBackOff`` ...) is reported as a failed
  block with the reason, instead of leaving the run waiting forever, and a
  failed pod's error carries its exit code and last output lines;
* pods Parsl does not delete itself (Failed ones, a bad-state executor's) are
  deleted at shutdown by label.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import ProfileConfig
from ..errors import ConfigError, ExecutorError, ParslChatError

__all__ = [
    "ClusterAccess",
    "cluster_record",
    "delete_provider_pods",
    "delete_run_pods",
    "kubernetes_provider",
    "pod_prefix",
    "probe_cluster",
    "resolve_access",
    "run_label",
]

log = logging.getLogger("parsl_chat.backends.kube")

RUN_LABEL = "parsl-chat/run-id"
RUN_ANNOTATION = "parsl-chat/run-id"  # the exact run id (the label value may be sanitised)
MANAGED_BY = {"app.kubernetes.io/managed-by": "parsl-chat"}
PROBE_TIMEOUT_S = 5.0
API_TIMEOUT_S = 15.0  # cleanup calls: bounded, a dead API server must not hang the driver's exit
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# Waiting reasons after which a pod never starts without someone changing something.
STUCK_REASONS = frozenset({"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"})
_CPU = re.compile(r"^(\d+(\.\d+)?|\.\d+)m?$")
_MEMORY = re.compile(r"^(\d+(\.\d+)?|\.\d+)([EPTGMK]i|[EPTGMk]|m|e\d+)?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
IN_CLUSTER = "in-cluster"


# --------------------------------------------------------------------------- naming


def run_label(run_id: str) -> str:
    """The run id as a label value (63 chars of [-_.A-Za-z0-9]); a hash keeps sanitised ids distinct."""
    if _LABEL_VALUE.match(run_id):
        return run_id
    cleaned = re.sub(r"[^-A-Za-z0-9_.]+", "-", run_id)[:54].strip("-_.")
    return f"{cleaned}-{hashlib.sha1(run_id.encode()).hexdigest()[:8]}".lstrip("-")


def pod_prefix(run_id: str) -> str:
    """Pod names are ``<prefix>.<8 hex>``: lowercase DNS, short enough to stay a valid hostname."""
    from parsl.utils import sanitize_dns_subdomain_rfc1123

    try:
        base = sanitize_dns_subdomain_rfc1123(f"parsl-chat-{run_id}" if run_id else "parsl-chat")
    except ValueError:
        base = "parsl-chat"
    return base[:54].rstrip(".-")


# --------------------------------------------------------------------------- which cluster


@dataclass(frozen=True)
class ClusterAccess:
    """Where the pods go: kubeconfig file(s) (None: in-cluster service account), context, namespace."""

    kubeconfig: str | None
    context: str
    namespace: str
    source: str  # how the kubeconfig was chosen, for messages

    def describe(self) -> str:
        if self.kubeconfig is None:
            return f"in-cluster service account, namespace {self.namespace}"
        return f"kubeconfig {self.kubeconfig} ({self.source}), context {self.context}, namespace {self.namespace}"

    def kubectl(self) -> str:
        """The same check as a kubectl command line, for hints."""
        if self.kubeconfig is None:
            return f"kubectl -n {self.namespace} get pods"
        return f"kubectl --kubeconfig {self.kubeconfig} --context {self.context} -n {self.namespace} get pods"


def _no_client() -> ExecutorError:
    return ExecutorError(
        "the kubernetes profile needs the Kubernetes Python client, which is not installed",
        hint="pip install 'parsl-chat[kubernetes]'",
    )


def resolve_access(profile: ProfileConfig) -> ClusterAccess:
    """Pick the kubeconfig and context now (the client only reads $KUBECONFIG when imported)."""
    try:
        from kubernetes import config as kconfig
    except ImportError:
        raise _no_client() from None

    hint = "set 'kubeconfig:' and 'context:' in the profile (or PARSL_CHAT_KUBECONFIG / PARSL_CHAT_CONTEXT)"
    files: str | None
    if profile.kubeconfig:
        path = Path(profile.kubeconfig).expanduser()
        if not path.is_file():
            raise ExecutorError(f"kubeconfig {path} (profile key 'kubeconfig') does not exist", hint=hint)
        files, source = str(path.resolve()), "profile"
    elif os.environ.get("KUBECONFIG"):
        named = [Path(p).expanduser() for p in os.environ["KUBECONFIG"].split(os.pathsep) if p]
        existing = [str(p.resolve()) for p in named if p.is_file()]
        if not existing:
            raise ExecutorError(f"KUBECONFIG={os.environ['KUBECONFIG']} names no existing file", hint=hint)
        files, source = os.pathsep.join(existing), "$KUBECONFIG"
    elif (Path.home() / ".kube" / "config").is_file():
        files, source = str(Path.home() / ".kube" / "config"), "default"
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        return ClusterAccess(None, profile.context or IN_CLUSTER, profile.namespace, IN_CLUSTER)
    else:
        raise ExecutorError(
            "no Kubernetes cluster configured: the profile sets no 'kubeconfig', KUBECONFIG is unset, "
            f"{Path.home() / '.kube' / 'config'} does not exist, and this is not a pod",
            hint=hint,
        )
    try:
        contexts, current = kconfig.list_kube_config_contexts(config_file=files)
    except (kconfig.ConfigException, OSError, ValueError) as exc:  # yaml errors are ValueErrors
        raise ExecutorError(f"kubeconfig {files} is not usable: {exc}", hint=hint) from None
    names = [c.get("name") for c in contexts or []]
    context = profile.context or (current or {}).get("name")
    if not context:
        raise ExecutorError(f"kubeconfig {files} sets no current-context and the profile names none", hint=hint)
    if context not in names:
        raise ExecutorError(
            f"context {context!r} is not in kubeconfig {files}; its contexts: {', '.join(map(str, names)) or 'none'}",
            hint=hint,
        )
    return ClusterAccess(files, context, profile.namespace, source)


def _api_client(access: ClusterAccess) -> Any:
    """An ApiClient of its own: no global kubernetes-client state is read or changed."""
    from kubernetes import client
    from kubernetes import config as kconfig

    try:
        if access.kubeconfig is None:
            cfg = client.Configuration()
            kconfig.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        return kconfig.new_client_from_config(config_file=access.kubeconfig, context=access.context)
    except (kconfig.ConfigException, OSError, ValueError) as exc:
        raise ExecutorError(
            f"cannot load Kubernetes credentials ({access.describe()}): {exc}", hint=f"check that '{access.kubectl()}' works"
        ) from None


def _why(exc: BaseException, timeout_s: float) -> str:
    """The cause of a failed HTTP call in words (urllib3 wraps it in MaxRetryError)."""
    import urllib3

    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None else exc
    text = str(reason)
    # order matters: urllib3's NewConnectionError (and NameResolutionError) subclass ConnectTimeoutError
    if isinstance(reason, urllib3.exceptions.NameResolutionError) or "Name or service not known" in text:
        return "the server's host name does not resolve"
    if "Connection refused" in text:
        return "connection refused"
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        return f"cannot connect: {text}"
    if isinstance(reason, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(reason, urllib3.exceptions.SSLError):
        return f"TLS error: {text}"
    return f"{type(reason).__name__}: {text}"


def probe_cluster(access: ClusterAccess, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Reach the API server and the namespace within ``timeout_s``, or raise ExecutorError saying why."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api = _api_client(access)
    cfg = copy.deepcopy(api.configuration)
    cfg.retries = 0  # urllib3 retries 3 times by default: a dead host would take 4 timeouts
    probe_api = client.ApiClient(cfg)
    server = cfg.host
    where = f"{access.describe()}, server {server}"
    hint = f"check that the cluster is up and that '{access.kubectl()}' works; or pick another cluster in the profile"
    outcome: list[BaseException | None] = []

    def check() -> None:
        try:
            client.CoreApi(probe_api).get_api_versions(_request_timeout=timeout_s)
            core = client.CoreV1Api(probe_api)
            try:
                core.read_namespace(access.namespace, _request_timeout=timeout_s)
            except ApiException as exc:
                if exc.status != 403:
                    raise
                # namespace-scoped credentials may not read namespaces: listing pods is what we need
                core.list_namespaced_pod(access.namespace, limit=1, _request_timeout=timeout_s)
            outcome.append(None)
        except BaseException as exc:  # reported to the caller's thread
            outcome.append(exc)

    # a thread bounds what urllib3's timeouts do not: DNS lookups, credential plugins
    thread = threading.Thread(target=check, name="parsl-chat-kube-probe", daemon=True)
    thread.start()
    thread.join(timeout_s * 2 + 1)
    if thread.is_alive() or not outcome:
        raise ExecutorError(f"Kubernetes API server did not answer within {timeout_s * 2:g} s ({where})", hint=hint)
    exc = outcome[0]
    if exc is None:
        return
    if isinstance(exc, ApiException):
        if exc.status == 404:
            raise ExecutorError(
                f"Kubernetes namespace {access.namespace!r} does not exist ({where})",
                hint=f"create it (kubectl create namespace {access.namespace}) or set 'namespace:' in the profile",
            )
        if exc.status == 401:
            raise ExecutorError(f"the Kubernetes API server rejected the credentials (401 Unauthorized) ({where})", hint=hint)
        if exc.status == 403:
            raise ExecutorError(
                f"not allowed to list pods in namespace {access.namespace!r} (403 Forbidden) ({where})",
                hint="parsl-chat needs get/list/create/delete on pods in that namespace (a Role and RoleBinding)",
            )
        raise ExecutorError(f"the Kubernetes API server answered {exc.status} {exc.reason} ({where})", hint=hint)
    raise ExecutorError(f"cannot reach the Kubernetes API server: {_why(exc, timeout_s)} ({where})", hint=hint)


# --------------------------------------------------------------------------- the provider


def _check_profile(profile: ProfileConfig) -> float:
    """Fail on values the API server would reject only after Parsl started; returns the CPU count."""
    where = f"profile {profile.name!r}"
    if not _CPU.match(str(profile.pod_cpu)):
        raise ConfigError(f"{where}: pod_cpu {profile.pod_cpu!r} is not a CPU quantity (e.g. 1, 0.5, 500m)")
    if not _MEMORY.match(str(profile.pod_memory)):
        raise ConfigError(f"{where}: pod_memory {profile.pod_memory!r} is not a memory quantity (e.g. 512Mi, 2Gi)")
    if profile.image_pull_policy not in PULL_POLICIES:
        raise ConfigError(f"{where}: image_pull_policy {profile.image_pull_policy!r} is not one of {', '.join(PULL_POLICIES)}")
    if not profile.image:
        raise ConfigError(f"{where}: 'image' is empty; the pods need an image with parsl-chat installed")
    cpu = str(profile.pod_cpu)
    return float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


@functools.cache
def _pod_api_class() -> type:
    from kubernetes import client

    class PodDecoratingApi(client.CoreV1Api):  # type: ignore[misc]
        """CoreV1Api whose pod creation passes the body through ``decorate`` first.

        Parsl's ``_create_pod`` builds the V1Pod and sends it in one method; this is
        the one place to add spec fields without copying that method.
        """

        def __init__(self, api_client: Any, decorate: Any) -> None:
            super().__init__(api_client)
            self._decorate = decorate

        # the client's signature lists every optional keyword; they are passed through untouched
        def create_namespaced_pod(self, namespace: str, body: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            return super().create_namespaced_pod(namespace, self._decorate(body), **kwargs)

    return PodDecoratingApi


def _store_provider_options(provider: Any, base: type, **options: Any) -> None:
    """What ``base.__init__`` (Parsl's KubernetesProvider) does, except its ``load_kube_config()``.

    Parsl's constructor loads the default kubeconfig, then stores each argument as the
    attribute of the same name (empty dicts for ``extra_requests``/``extra_limits`` left
    unset), an empty ``resources`` and a ``kube_client`` (replaced by the caller). The
    options are bound to Parsl's own signature, so its defaults fill those not given and
    an unknown one is a TypeError, as with the constructor.
    """
    bound = inspect.signature(base).bind(**options)
    bound.apply_defaults()
    for name, value in bound.arguments.items():
        setattr(provider, name, value)
    provider.extra_requests = provider.extra_requests or {}
    provider.extra_limits = provider.extra_limits or {}
    provider.resources = {}


def _parsl_options(profile: ProfileConfig, access: ClusterAccess, run_id: str, worker_init: str, cpu: float) -> dict[str, Any]:
    """The arguments of Parsl's KubernetesProvider for this profile and run."""
    return {
        "image": profile.image,
        "namespace": access.namespace,
        "nodes_per_block": 1,
        "init_blocks": profile.init_blocks,
        "min_blocks": profile.min_blocks,
        "max_blocks": profile.max_blocks,
        "max_cpu": cpu,
        "init_cpu": cpu,
        "max_mem": str(profile.pod_memory),
        "init_mem": str(profile.pod_memory),
        "worker_init": worker_init,
        "pod_name": pod_prefix(run_id),
        "service_account_name": profile.service_account,
        "annotations": {RUN_ANNOTATION: run_id} if run_id else None,
        "persistent_volumes": [],
    }


def _decorate_pod(pod: Any, profile: ProfileConfig, labels: dict[str, str]) -> Any:
    """Add to Parsl's V1Pod what its provider has no option for."""
    from kubernetes import client

    meta, spec = pod.metadata, pod.spec
    meta.labels = {**(meta.labels or {}), **labels}
    # Parsl's pool exits when the interchange goes away; "Always" (the API default)
    # would restart it against a dead interchange until someone deletes the pod.
    spec.restart_policy = "Never"
    if profile.node_selector:
        spec.node_selector = dict(profile.node_selector)
    quantities = {"cpu": str(profile.pod_cpu), "memory": str(profile.pod_memory)}
    for container in spec.containers:
        container.image_pull_policy = profile.image_pull_policy
        # requests == limits: Guaranteed QoS, so a node never evicts a pod mid-run for memory
        container.resources = client.V1ResourceRequirements(requests=dict(quantities), limits=dict(quantities))
        container.env = [*(container.env or []), _field_env("PARSL_CHAT_POD_NAME", "metadata.name"),
                         _field_env("PARSL_CHAT_POD_NODE", "spec.nodeName")]  # fmt: skip
    return pod


def _explain_status(api: Any, namespace: str, job_id: object, entry: dict[str, Any]) -> None:
    """Give a pending pod that cannot start, or a failed one, its own reason (and say why one is not scheduled)."""
    from parsl.jobs.states import JobState, JobStatus

    state, message = entry["status"].state, entry["status"].message
    if state not in (JobState.PENDING, JobState.FAILED) or message is not None:
        return
    try:
        pod = api.read_namespaced_pod(entry["pod_name"], namespace, _request_timeout=API_TIMEOUT_S)
    except Exception:  # the next poll tries again
        return
    if state == JobState.PENDING:
        stuck = _stuck_reason(pod)
        if stuck:
            log.warning("pod %s cannot start: %s", job_id, stuck)
            entry["status"] = JobStatus(JobState.FAILED, message=f"pod {job_id} cannot start: {stuck}")
        elif not entry.get("warned") and _unschedulable(pod):
            # not a failure: an autoscaler may add a node; but say why nothing runs
            entry["warned"] = True
            log.warning("pod %s is not scheduled yet: %s", job_id, _unschedulable(pod))
        return
    exit_code, why = _termination(pod)
    tail = _log_tail(api, namespace, entry["pod_name"])
    text = f"pod {job_id} failed" + (f" ({why})" if why else "") + (f"; its last output: {tail}" if tail else "")
    log.warning("%s", text)
    entry["status"] = JobStatus(JobState.FAILED, message=text, exit_code=exit_code)


def _log_tail(api: Any, namespace: str, pod_name: str, lines: int = 5) -> str:
    try:
        text = api.read_namespaced_pod_log(pod_name, namespace, tail_lines=lines, _request_timeout=API_TIMEOUT_S)
    except Exception:  # the log is a courtesy; the failure is reported without it
        return ""
    return " | ".join(line.strip() for line in str(text).splitlines()[-lines:] if line.strip())[-400:]


@functools.cache
def _provider_class() -> type:
    from parsl.providers import KubernetesProvider

    class ParslChatKubernetesProvider(KubernetesProvider):  # type: ignore[misc]
        """Parsl's provider with an explicit cluster, run labels and a fuller pod spec."""

        def __init__(
            self,
            *,
            profile: ProfileConfig,
            access: ClusterAccess,
            api_client: Any,
            run_id: str,
            worker_init: str,
            cpu: float,
        ) -> None:
            # Parsl's constructor calls load_kube_config() with no arguments, which reads whatever
            # $KUBECONFIG was at import time and fails without ~/.kube/config; this provider's
            # client is built from `access` instead, so only the rest of that constructor is done.
            _store_provider_options(self, KubernetesProvider, **_parsl_options(profile, access, run_id, worker_init, cpu))
            self.profile = profile
            self.access = access
            self.run_id = run_id
            self.labels = {**MANAGED_BY, RUN_LABEL: run_label(run_id)} if run_id else dict(MANAGED_BY)
            self.label_selector = ",".join(f"{k}={v}" for k, v in self.labels.items())
            self.kube_client = _pod_api_class()(api_client, self.decorate_pod)

        @property
        def status_polling_interval(self) -> int:
            # Parsl's 60 s would hold back the first block's results and every scaling decision
            return self.profile.status_polling_s

        def decorate_pod(self, pod: Any) -> Any:
            """Add to Parsl's V1Pod what its provider has no option for."""
            return _decorate_pod(pod, self.profile, self.labels)

        def submit(self, cmd_string: str, tasks_per_node: int, job_name: str = "parsl.kube") -> str:
            # Parsl's job id is a random 8-hex string; the pod name (which contains it) is what
            # users, `kubectl` and the rows' job_id column know, so it becomes the job id.
            job_id = super().submit(cmd_string, tasks_per_node, job_name)
            entry = self.resources.pop(job_id)
            self.resources[entry["pod_name"]] = entry
            log.info("pod %s created in namespace %s", entry["pod_name"], self.namespace)
            return str(entry["pod_name"])

        def _status(self) -> None:
            super()._status()
            # Parsl reads only the phase: a pod that cannot get its image would stay Pending
            # forever, and a failed pod would be reported as "see the submit_scripts directory",
            # which Kubernetes blocks do not have. Both get the pod's own reason instead.
            for job_id, entry in self.resources.items():
                _explain_status(self.kube_client, self.namespace, job_id, entry)

        def delete_leftover_pods(self) -> list[str]:
            """Delete every pod of this run still in the API (Parsl skips Failed ones and bad states)."""
            return _delete_pods(self.kube_client, self.namespace, self.label_selector, [])

    return ParslChatKubernetesProvider


def _field_env(name: str, field_path: str) -> Any:
    from kubernetes import client

    return client.V1EnvVar(
        name=name, value_from=client.V1EnvVarSource(field_ref=client.V1ObjectFieldSelector(field_path=field_path))
    )


def _stuck_reason(pod: Any) -> str | None:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        waiting = status.state.waiting if status.state else None
        if waiting is not None and waiting.reason in STUCK_REASONS:
            return f"{waiting.reason}: {waiting.message or 'no message'} (image {status.image})"
    return None


def _unschedulable(pod: Any) -> str | None:
    for cond in (pod.status.conditions or []) if pod.status else []:
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            return str(cond.message or "Unschedulable")
    return None


def _termination(pod: Any) -> tuple[int | None, str]:
    """Exit code and reason of the pod's (first) terminated container."""
    for status in (pod.status.container_statuses or []) if pod.status else []:
        done = status.state.terminated if status.state else None
        if done is not None:
            detail = ", ".join(str(x) for x in (done.reason, done.message) if x)
            return done.exit_code, f"exit code {done.exit_code}" + (f", {detail}" if detail else "")
    return None, str(pod.status.reason or "") if pod.status else ""


def kubernetes_provider(profile: ProfileConfig, worker_init: str, run_id: str = "") -> Any:
    """Parsl's KubernetesProvider for ``profile``, after checking that the cluster answers."""
    cpu = _check_profile(profile)
    access = resolve_access(profile)
    probe_cluster(access)
    log.info("Kubernetes: %s", access.describe())
    return _provider_class()(
        profile=profile, access=access, api_client=_api_client(access), run_id=run_id, worker_init=worker_init, cpu=cpu
    )


# --------------------------------------------------------------------------- cleanup


def cluster_record(profile: ProfileConfig, run_id: str) -> dict[str, Any]:
    """What ``cleanup`` needs to find this run's pods without the driver (for run.json's ``kubernetes``)."""
    access = resolve_access(profile)
    return {
        **asdict(access),
        "label_selector": f"{RUN_LABEL}={run_label(run_id)}",
        "pod_prefix": pod_prefix(run_id),
    }


def _delete_pods(core: Any, namespace: str, selector: str, names: list[str]) -> list[str]:
    """Delete the pods matching ``selector`` plus the named ones; returns those that existed."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    found = [
        p.metadata.name
        for p in core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=API_TIMEOUT_S).items
    ]
    deleted: list[str] = []
    for name in dict.fromkeys([*found, *names]):
        try:
            core.delete_namespaced_pod(
                name, namespace, body=client.V1DeleteOptions(grace_period_seconds=5), _request_timeout=API_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status == 404:  # gone already (Parsl scaled it in, or someone else did)
                continue
            raise
        deleted.append(name)
    return deleted


def delete_provider_pods(provider: Any) -> list[str]:
    """At driver shutdown: delete what Parsl left (Failed pods, pods of a bad-state executor)."""
    if provider is None or not hasattr(provider, "delete_leftover_pods"):
        return []
    try:
        deleted: list[str] = provider.delete_leftover_pods()
    except Exception as exc:  # never mask the run's own outcome; `parsl-chat cleanup` can retry
        log.warning("could not delete the run's leftover pods: %s", _why(exc, API_TIMEOUT_S))
        return []
    if deleted:
        log.info("deleted leftover pod(s): %s", ", ".join(deleted))
    return deleted


def _record_from_options(meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the cluster record of a run.json without one, from the options the run was started with."""
    from ..config import load_settings

    options = meta.get("options") or {}
    try:
        settings = load_settings(
            profile=options.get("profile") or meta.get("profile") or "kubernetes",
            config_file=options.get("config_file"),
            cli=options.get("cli") or {},
        )
    except ParslChatError as exc:
        raise ExecutorError(
            f"cannot tell which Kubernetes cluster this run used: its profile does not load here ({exc})",
            hint="run cleanup from the directory the run was started in, with the same environment",
        ) from None
    return cluster_record(settings.profile, str(meta.get("run_id") or ""))


def delete_run_pods(meta: dict[str, Any]) -> list[str]:
    """Delete the pods a run (described by its run.json) left in the cluster; returns their names."""
    run_id = str(meta.get("run_id") or "")
    if not run_id:
        raise ExecutorError("run.json has no run_id: cannot tell which pods belong to the run")
    record = meta.get("kubernetes") or _record_from_options(meta)
    access = ClusterAccess(
        kubeconfig=record.get("kubeconfig"),
        context=str(record.get("context") or IN_CLUSTER),
        namespace=str(record.get("namespace") or "default"),
        source=str(record.get("source") or "run.json"),
    )
    selector = str(record.get("label_selector") or f"{RUN_LABEL}={run_label(run_id)}")
    prefix = str(record.get("pod_prefix") or pod_prefix(run_id))
    # the job ids of the blocks are pod names; also catches pods whose labels were edited away
    named = [str(b["job_id"]) for b in meta.get("blocks", []) if str(b.get("job_id") or "").startswith(prefix + ".")]
    probe_cluster(access)
    from kubernetes import client

    try:
        return _delete_pods(client.CoreV1Api(_api_client(access)), access.namespace, selector, named)
    except Exception as exc:
        raise ExecutorError(
            f"could not delete the run's pods: {_why(exc, API_TIMEOUT_S)} ({access.describe()})",
            hint=f"delete them by hand: kubectl delete pods -l {selector} -n {access.namespace}",
        ) from None
