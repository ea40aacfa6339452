"""The OCI runtime spec of the sample container, built as an ordered list of steps.

The spec starts as containerd's default unprivileged spec (`defaults.default_spec`).
Then each step in STEPS applies one thing: the image config, then a sampler flag, in
ctr-remote's order. The order is the order of STEPS:

    image config → --env → --mount → /etc files → entrypoint/args → --env-file
                 → --user → --cwd → -t → network → --gpus → namespaces

So `--env-file` comes after `--env` and wins over it for the same key, as upstream does.
The monitor's mount namespace is joined last, as ctr-remote's analyzer appends it. Every
runner builds its spec through `build_spec`, so they all give the workload the same
process. Its only I/O is reading files named by flags (`--env-file`) and the image's
/etc/passwd and /etc/group, through a resolver confined to the rootfs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from estargz_opt.errors import BadInputError
from estargz_opt.stores.containerd.model import DEFAULT_NAMESPACE
from estargz_opt.workload.options import SamplerOptions, parse_gpus, parse_mount
from estargz_opt.workload.spec.defaults import DEFAULT_PATH_ENV, Spec, default_spec
from estargz_opt.workload.spec.environ import merge_env, read_env_file
from estargz_opt.workload.spec.etcfiles import ETC_FILES
from estargz_opt.workload.spec.imageconfig import config_section, process_args
from estargz_opt.workload.spec.users import resolve_user

#: The host's files bound read-only with --net-host, in this order.
HOST_ETC_FILES: tuple[str, ...] = ("/etc/hosts", "/etc/resolv.conf")

#: Why the gpus option cannot work here (said before anything is set up, and by the gpus
#: step): a template over the term `gpus` (EstargzOptError.with_terms).
NO_GPU_HOOK = (
    "{gpus} needs the NVIDIA Container Toolkit (nvidia-container-runtime-hook was not "
    "found on PATH)"
)


@dataclass(frozen=True, slots=True)
class SpecInputs:
    """What the steps read: the image config, the flags, and where the runner put things.

    rootfs: the absolute path of the mounted root filesystem.
    etc_dir: the directory holding the generated files of ETC_FILES (`resolv.conf`,
        `hosts`), bound onto /etc. With --net-host the host's files are bound instead.
    mount_ns_path: /proc/<pid>/ns/mnt of the file-access monitor, for the container to join.
    netns_path: the CNI network namespace to join (--cni).
    container_id/namespace: give the cgroups path /<namespace>/<id> as containerd does.
    files_root: where this process can read the rootfs's /etc/passwd and /etc/group, when
        `rootfs` is mounted only in another mount namespace (default: `rootfs`).
    gpu_hook: the NVIDIA container runtime hook, needed for gpus (see find_gpu_hook).
    """

    image_config: dict[str, Any]
    opts: SamplerOptions
    rootfs: str
    hostname: str = ""
    etc_dir: str | None = None
    mount_ns_path: str | None = None
    netns_path: str | None = None
    container_id: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    files_root: str | None = None
    gpu_hook: str | None = None

    @property
    def config(self) -> dict[str, Any]:
        """The image config's "config" object (Env, Cmd, User, …)."""
        return config_section(self.image_config)

    @property
    def files(self) -> str:
        """Where the rootfs's files can be read from this process."""
        return self.files_root or self.rootfs

    @property
    def cgroups_path(self) -> str | None:
        return f"/{self.namespace}/{self.container_id}" if self.container_id else None


#: One step: changes the spec in place, reading only the inputs.
Step = Callable[[Spec, SpecInputs], None]


def apply_image_config(spec: Spec, inputs: SpecInputs) -> None:
    """containerd's WithImageConfig: the image's Env (else the default PATH), WorkingDir
    and User. The command is set by `apply_args`, after the mounts."""
    cfg = inputs.config
    process = spec["process"]
    process["env"] = merge_env(list(cfg.get("Env") or [DEFAULT_PATH_ENV]), [])
    process["cwd"] = cfg.get("WorkingDir") or "/"
    process["user"] = resolve_user(inputs.files, cfg.get("User") or "")


def apply_env(spec: Spec, inputs: SpecInputs) -> None:
    """env: each K=V replaces the same key in place or is appended; a bare K unsets."""
    spec["process"]["env"] = merge_env(spec["process"]["env"], inputs.opts.env)


def apply_mounts(spec: Spec, inputs: SpecInputs) -> None:
    """mounts: added after the default mounts, in the order given."""
    spec["mounts"] += [parse_mount(m) for m in inputs.opts.mounts]


def apply_etc_files(spec: Spec, inputs: SpecInputs) -> None:
    """/etc/resolv.conf and /etc/hosts: the generated files, or the host's with --net-host."""
    if inputs.opts.net_host:
        for f in HOST_ETC_FILES:
            spec["mounts"].append(
                {"destination": f, "type": "bind", "source": f, "options": ["rbind", "ro"]}
            )
    elif inputs.etc_dir is not None:
        for name in ETC_FILES:
            spec["mounts"].append(
                {
                    "destination": f"/etc/{name}",
                    "type": "bind",
                    "source": os.path.join(inputs.etc_dir, name),
                    "options": ["bind"],
                }
            )


def apply_args(spec: Spec, inputs: SpecInputs) -> None:
    """(--entrypoint or Entrypoint) + (--args or Cmd); a workload needs a command."""
    args = process_args(inputs.image_config, inputs.opts)
    if not args:
        raise BadInputError(
            "the image has no Entrypoint or Cmd; give one with --entrypoint or --args"
        )
    spec["process"]["args"] = args


def apply_env_file(spec: Spec, inputs: SpecInputs) -> None:
    """env_file: merged after env, so it wins for the same key, as upstream."""
    if inputs.opts.env_file:
        process = spec["process"]
        process["env"] = merge_env(process["env"], read_env_file(inputs.opts.env_file))


def apply_user(spec: Spec, inputs: SpecInputs) -> None:
    """user replaces the image's User, resolved in the image's own passwd and group."""
    if inputs.opts.user:
        spec["process"]["user"] = resolve_user(inputs.files, inputs.opts.user)


def apply_cwd(spec: Spec, inputs: SpecInputs) -> None:
    """cwd replaces the image's WorkingDir."""
    if inputs.opts.cwd:
        spec["process"]["cwd"] = inputs.opts.cwd


def apply_tty(spec: Spec, inputs: SpecInputs) -> None:
    """-t: a terminal, and TERM=xterm appended as containerd's WithTTY does."""
    if inputs.opts.terminal:
        process = spec["process"]
        process["terminal"] = True
        process["env"] = [*process["env"], "TERM=xterm"]


def apply_network(spec: Spec, inputs: SpecInputs) -> None:
    """net_host drops the network namespace; cni joins the CNI one (netns_path)."""
    linux = spec["linux"]
    if inputs.opts.net_host:
        linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
    elif inputs.netns_path is not None:
        _set_namespace_path(spec, "network", inputs.netns_path)


def apply_gpus(spec: Spec, inputs: SpecInputs) -> None:
    """gpus: the NVIDIA Container Toolkit's prestart hook injects the devices and the
    driver libraries the NVIDIA_* variables ask for (what `--gpus` does in docker)."""
    if not inputs.opts.gpus:
        return
    devices = parse_gpus(inputs.opts.gpus)
    hook = inputs.gpu_hook
    if hook is None:
        raise BadInputError.with_terms(NO_GPU_HOOK, gpus="gpus")
    visible = ",".join(d.split("=", 1)[1] for d in devices)
    process = spec["process"]
    process["env"] = merge_env(
        process["env"], [f"NVIDIA_VISIBLE_DEVICES={visible}", "NVIDIA_DRIVER_CAPABILITIES=all"]
    )
    spec["hooks"] = {"prestart": [{"path": hook, "args": [os.path.basename(hook), "prestart"]}]}


def apply_namespaces(spec: Spec, inputs: SpecInputs) -> None:
    """Join the monitor's mount namespace, where the rootfs is mounted and watched."""
    if inputs.mount_ns_path is not None:
        _set_namespace_path(spec, "mount", inputs.mount_ns_path)


def _set_namespace_path(spec: Spec, kind: str, path: str) -> None:
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] == kind:
            ns["path"] = path


#: The steps, in the order they apply: this list is the order.
STEPS: tuple[Step, ...] = (
    apply_image_config,
    apply_env,
    apply_mounts,
    apply_etc_files,
    apply_args,
    apply_env_file,
    apply_user,
    apply_cwd,
    apply_tty,
    apply_network,
    apply_gpus,
    apply_namespaces,
)


def build_spec(
    image_config: dict[str, Any],
    opts: SamplerOptions,
    rootfs: str,
    hostname: str,
    *,
    etc_dir: str | None = None,
    mount_ns_path: str | None = None,
    netns_path: str | None = None,
    container_id: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    files_root: str | None = None,
    gpu_hook: str | None = None,
) -> Spec:
    """The OCI runtime spec (a JSON-ready dict) for the sample container; see SpecInputs."""
    opts.validate()
    if not os.path.isabs(rootfs):
        raise BadInputError(f"rootfs {rootfs!r} must be an absolute path")
    # Positional, in SpecInputs' field order (the signature above mirrors it).
    inputs = SpecInputs(
        image_config,
        opts,
        rootfs,
        hostname,
        etc_dir,
        mount_ns_path,
        netns_path,
        container_id,
        namespace,
        files_root,
        gpu_hook,
    )
    spec = default_spec(rootfs, hostname, inputs.cgroups_path)
    for step in STEPS:
        step(spec, inputs)
    return spec


def find_gpu_hook() -> str | None:
    """The NVIDIA Container Toolkit's OCI prestart hook, if installed."""
    return shutil.which("nvidia-container-runtime-hook") or shutil.which("nvidia-container-toolkit")
