"""`--cni`: give the sample container its own network namespace, set up by CNI plugins.

ctr-remote creates a named network namespace under /var/run/netns, loads the first CNI
network configuration of the plugin conf dir (go-cni's `WithDefaultConf`) and runs the
plugins' ADD on it; cleanup runs DEL and deletes the namespace. This is the same, with
the plugins called directly as the CNI spec describes (JSON config on stdin, CNI_*
variables in the environment).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from estargz_opt import jsonlimits
from estargz_opt.errors import BadInputError, NetworkError, literal
from estargz_opt.workload.options import SamplerOptions

log = logging.getLogger("estargz_opt")

NETNS_DIR = "/var/run/netns"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_PLUGIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
IFNAME = "eth0"


def _cni_error(text: str) -> NetworkError:
    """An error of the workload's CNI network: `text`, after the option's name."""
    return NetworkError.with_terms("{cni}: " + literal(text), cni="cni")


def load_conf(conf_dir: str) -> dict[str, Any]:
    """The first network config in `conf_dir` (lexical order), as a conflist."""
    directory = Path(conf_dir or DEFAULT_CONF_DIR)
    try:
        files = sorted(
            p for p in directory.iterdir() if p.suffix in (".conf", ".conflist", ".json")
        )
    except OSError as exc:
        raise _cni_error(f"cannot read the CNI config dir {directory}: {exc.strerror}") from None
    if not files:
        raise _cni_error(f"no CNI network config (*.conf, *.conflist) in {directory}")
    path = files[0]
    try:
        doc = jsonlimits.loads_object(path.read_bytes(), str(path))
    except OSError as exc:
        raise _cni_error(f"cannot read {path}: {exc.strerror}") from None
    except BadInputError as exc:
        raise _cni_error(str(exc)) from None
    if "plugins" in doc:
        return doc
    # A single-plugin .conf is a list of one.
    return {
        "cniVersion": doc.get("cniVersion", "0.4.0"),
        "name": doc.get("name", ""),
        "plugins": [doc],
    }


def plugin_path(kind: str, plugin_dir: str) -> str:
    dirs = [plugin_dir] if plugin_dir else list(DEFAULT_PLUGIN_DIRS)
    for d in dirs:
        candidate = os.path.join(d, kind)
        if os.access(candidate, os.X_OK):
            return candidate
    raise _cni_error(f"CNI plugin {kind!r} not found in {', '.join(dirs)}")


def _run_plugin(
    command: str, conf: dict[str, Any], cid: str, netns: str, plugin_dir: str
) -> dict[str, Any]:
    exe = plugin_path(conf.get("type", ""), plugin_dir)
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": netns,
        "CNI_IFNAME": IFNAME,
        "CNI_PATH": os.path.dirname(exe),
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    proc = subprocess.run(
        [exe], input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=60
    )
    if proc.returncode != 0:
        try:
            msg = str(jsonlimits.loads_object(proc.stdout, "CNI error").get("msg", ""))
        except BadInputError:
            msg = proc.stderr.decode(errors="replace").strip()
        raise _cni_error(f"plugin {conf.get('type')} {command} failed: {msg}")
    if command != "ADD" or not proc.stdout.strip():
        return {}
    try:
        return jsonlimits.loads_object(proc.stdout, f"plugin {conf.get('type')} result")
    except BadInputError as exc:
        raise _cni_error(str(exc)) from None


def _create_netns(name: str) -> str:
    """A named network namespace in NETNS_DIR, made by iproute2 as for any netns user."""
    try:
        res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    except FileNotFoundError:
        raise NetworkError.with_terms(
            "{cni} needs iproute2 (apt-get install iproute2)", cni="cni"
        ) from None
    if res.returncode != 0:
        raise _cni_error(f"cannot create a network namespace: {res.stderr.strip()}")
    return os.path.join(NETNS_DIR, name)


def _delete_netns(path: str) -> None:
    res = subprocess.run(["ip", "netns", "delete", os.path.basename(path)], capture_output=True)
    if res.returncode != 0 and os.path.exists(path):
        log.warning("cleanup: could not delete network namespace %s", path)


@contextlib.contextmanager
def cni_namespace(cid: str, opts: SamplerOptions) -> Iterator[str]:
    """A network namespace wired by the default CNI network; removed on exit."""
    conf = load_conf(opts.cni_plugin_conf_dir)
    path = _create_netns(cid)
    added: list[dict[str, Any]] = []
    try:
        prev: dict[str, Any] | None = None
        for plugin in conf["plugins"]:
            net = {
                "cniVersion": conf.get("cniVersion", "0.4.0"),
                "name": conf.get("name", ""),
                **plugin,
            }
            if prev:
                net["prevResult"] = prev
            added.append(net)
            prev = _run_plugin("ADD", net, cid, path, opts.cni_plugin_dir) or prev
        log.info("sample container network: %s (CNI %s)", conf.get("name", ""), path)
        yield path
    finally:
        for net in reversed(added):
            try:
                _run_plugin("DEL", net, cid, path, opts.cni_plugin_dir)
            except NetworkError as exc:
                log.warning("cleanup: %s", exc)
        _delete_netns(path)
