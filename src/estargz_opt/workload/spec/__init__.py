"""The sample container's OCI runtime spec, shared by every runner.

`build_spec` starts from containerd's default unprivileged spec (`defaults`) and applies
the ordered `steps.STEPS`. The other modules each hold one job the steps need:
`environ` (env merge, --env-file), `etcfiles` (resolv.conf, hosts), `users` (user and
groups from the image's files), `rootfs` (reading those files without leaving the
rootfs), `imageconfig` (command, stop signal). This package reads only its inputs and
files: no containerd, no runtime, no grpc.
"""

from estargz_opt.workload.options import (
    DEFAULT_PERIOD,
    SamplerOptions,
    parse_add_hosts,
    parse_gpus,
    parse_json_array,
    parse_mount,
)
from estargz_opt.workload.spec.defaults import DEFAULT_PATH_ENV, Spec, default_spec
from estargz_opt.workload.spec.environ import merge_env, read_env_file
from estargz_opt.workload.spec.etcfiles import (
    ETC_FILES,
    etc_file_texts,
    hosts_file,
    resolv_conf,
)
from estargz_opt.workload.spec.imageconfig import parse_signal, process_args, stop_signal
from estargz_opt.workload.spec.rootfs import read_rootfs_file
from estargz_opt.workload.spec.steps import (
    NO_GPU_HOOK,
    STEPS,
    SpecInputs,
    Step,
    build_spec,
    find_gpu_hook,
)
from estargz_opt.workload.spec.users import resolve_user

__all__ = [
    "DEFAULT_PATH_ENV",
    "DEFAULT_PERIOD",
    "ETC_FILES",
    "NO_GPU_HOOK",
    "STEPS",
    "SamplerOptions",
    "Spec",
    "SpecInputs",
    "Step",
    "build_spec",
    "default_spec",
    "etc_file_texts",
    "find_gpu_hook",
    "hosts_file",
    "merge_env",
    "parse_add_hosts",
    "parse_gpus",
    "parse_json_array",
    "parse_mount",
    "parse_signal",
    "process_args",
    "read_env_file",
    "read_rootfs_file",
    "resolv_conf",
    "resolve_user",
    "stop_signal",
]
