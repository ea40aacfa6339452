"""The /etc/resolv.conf and /etc/hosts the sample container gets (unless --net-host)."""

from __future__ import annotations

from estargz_opt.workload.options import SamplerOptions, csv_items, parse_add_hosts

# Docker's /etc/hosts defaults, which upstream writes before the --add-hosts lines.
HOSTS_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("127.0.0.1", "localhost"),
    ("::1", "localhost ip6-localhost ip6-loopback"),
    ("fe00::0", "ip6-localnet"),
    ("ff00::0", "ip6-mcastprefix"),
    ("ff02::1", "ip6-allnodes"),
    ("ff02::2", "ip6-allrouters"),
)

#: The generated files, by name under the run's etc directory, bound onto /etc/<name>.
ETC_FILES: tuple[str, ...] = ("resolv.conf", "hosts")


def resolv_conf(opts: SamplerOptions) -> str:
    """The /etc/resolv.conf the sample container gets (unless --net-host)."""
    lines = [f"nameserver {ns}\n" for ns in csv_items(opts.dns_nameservers)]
    search = csv_items(opts.dns_search_domains)
    if search:
        lines.append("search " + " ".join(search) + "\n")
    options = csv_items(opts.dns_options)
    if options:
        lines.append("options " + " ".join(options) + "\n")
    return "".join(lines)


def hosts_file(opts: SamplerOptions) -> str:
    """The /etc/hosts the sample container gets (unless --net-host)."""
    entries = list(HOSTS_DEFAULTS) + [(ip, h) for h, ip in parse_add_hosts(opts.add_hosts)]
    return "".join(f"{ip}\t{names}\n" for ip, names in entries)


def etc_file_texts(opts: SamplerOptions) -> dict[str, str]:
    """Each generated file's text, by its name in ETC_FILES."""
    return {"resolv.conf": resolv_conf(opts), "hosts": hosts_file(opts)}
