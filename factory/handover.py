"""What the client's IT receives beside the image: how to reach Jupyter and read its token,
what the firewall opens, where the audit trail is, and a Grafana dashboard for the node."""

from __future__ import annotations

import json
from pathlib import Path

from factory import image_layout
from factory.profile import LoadedProfile

# Every selector is filtered by the dashboard's $instance variable.
ON = 'instance=~"$instance"'
DASHBOARD_PANELS = [
    ("CPU busy (%)", f'100 * (1 - avg(rate(node_cpu_seconds_total{{mode="idle",{ON}}}[5m])))'),
    (
        "Memory used (%)",
        f"100 * (1 - node_memory_MemAvailable_bytes{{{ON}}} / node_memory_MemTotal_bytes{{{ON}}})",
    ),
    (
        "Root disk used (%)",
        f'100 * (1 - node_filesystem_avail_bytes{{mountpoint="/",{ON}}} '
        f'/ node_filesystem_size_bytes{{mountpoint="/",{ON}}})',
    ),
    ("Network in (bytes/s)", f'rate(node_network_receive_bytes_total{{device!="lo",{ON}}}[5m])'),
    ("Failed systemd units", f'sum(node_systemd_unit_state{{state="failed",{ON}}})'),
]


CPU_LEVEL_HINTS = {
    "x86-64-v1": "any x86-64 CPU",
    "x86-64-v2": "SSE4.2 and POPCNT: Intel Nehalem or AMD Bulldozer and later; VMware EVC "
    "'Intel Nehalem' or higher, Proxmox CPU type x86-64-v2-AES or host",
    "x86-64-v3": "AVX2: Intel Haswell or AMD Zen and later; VMware EVC 'Intel Haswell' or "
    "higher, Proxmox CPU type x86-64-v3 or host",
    "x86-64-v4": "AVX-512: Intel Skylake-SP or AMD Zen 4 and later; Proxmox CPU type "
    "x86-64-v4 or host",
}


def credentials_text(loaded: LoadedProfile) -> str:
    """How IT reads the first-boot secrets; none of them exists before the image boots."""
    profile = loaded.profile
    admin = profile.admin.user
    if profile.jupyter.tls:
        baked = [
            "No password or token is baked into this image. It does carry the private key of",
            f"the TLS certificate you supplied ({image_layout.TLS_KEY}, root only): keep",
            "the OVA and qcow2 as confidential as that key. On its first boot the machine makes",
            "its own SSH host keys and Jupyter token.",
        ]
    else:
        baked = [
            "No password, token or private key is baked into this image. On its first boot the",
            "machine makes its own SSH host keys, Jupyter token and a self-signed TLS",
            "certificate.",
        ]
    lines = [
        f"# {loaded.name}: access and credentials",
        "",
        *baked,
        "",
        f"- SSH: `ssh {admin}@HOST` with a key listed in the profile (passwords and root login",
        f"  are refused). {admin} is the only login account, also when the VM is imported",
        "  without a cloud-init seed. sshd allows 3 tries per connection: with more keys in",
        "  your SSH agent, name the key with `ssh -i KEY -o IdentitiesOnly=yes`.",
    ]
    if profile.jupyter.enabled:
        lines += [
            f"- Jupyter token: `ssh {admin}@HOST cat jupyter-token` (the file is readable by "
            f"{admin} only;",
            f"  the service reads {image_layout.JUPYTER_TOKEN_FILE}, readable by root only).",
            "- Jupyter: open `https://HOST/` and paste the token. Plain HTTP redirects to HTTPS.",
            f"- New token: `ssh {admin}@HOST sudo factory-rotate-token` (Jupyter restarts).",
            "- TLS certificate fingerprint, to compare with what the browser shows:",
            f"  `ssh {admin}@HOST openssl x509 -in {image_layout.TLS_CERTIFICATE} -noout "
            "-fingerprint -sha256`",
        ]
    ports = ", ".join(map(str, profile.open_ports()))
    firewall = "open inbound TCP ports" if profile.security.firewall else "firewall off; ports"
    lines += [
        f"- {firewall}: {ports}.",
        f"- Audit trail ({profile.security.audit_retention_days} days): "
        "`sudo ausearch -k factory-sudo`, `-k factory-login`, `-k factory-jupyter-token`;",
        "  the persistent journal (`journalctl`); Jupyter access in "
        f"{image_layout.JUPYTER_ACCESS_LOG}.",
        "  Audit logs are never deleted: size the disk for the period, or ship them to your log",
        "  server. When the disk runs short auditd warns in syslog, and at its last 50 MB it",
        "  takes the machine to single-user mode rather than stop recording.",
        "- Monitoring: the Prometheus node exporter answers on "
        + ("port 9100." if profile.monitoring.enabled else "127.0.0.1:9100 (not exposed)."),
        "  grafana-dashboard.json in this folder charts it.",
        "- Security updates: the image holds every Debian security update published when it",
        "  was built (security-index.json in this folder names the index and its date).",
        "- Automatic security updates: "
        + ("on." if profile.security.unattended_upgrades else "off (your IT patches)."),
        f"- CPU: the host must offer at least {profile.cpu_baseline} "
        f"({CPU_LEVEL_HINTS[profile.cpu_baseline]}); the image was validated on a CPU of "
        "exactly that level.",
        "  A lower CPU compatibility setting (VMware EVC mode, Proxmox CPU type, Hyper-V's",
        "  processor compatibility mode) can hide what its libraries need: NumPy then stops",
        "  with an illegal instruction.",
    ]
    return "\n".join(lines) + "\n"


def grafana_dashboard(loaded: LoadedProfile) -> dict:
    """A Grafana dashboard over the node exporter's metrics, filtered by instance."""
    panels = []
    for index, (title, expr) in enumerate(DASHBOARD_PANELS):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "targets": [{"expr": expr, "refId": "A"}],
            }
        )
    return {
        "title": f"{loaded.name} node",
        "uid": f"factory-{loaded.name}"[:40],
        "schemaVersion": 39,
        "tags": ["factory", loaded.profile.industry],
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "instance",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(node_uname_info, instance)",
                    "includeAll": True,
                },
            ]
        },
        "panels": panels,
    }


def write_handover(loaded: LoadedProfile, delivery: Path) -> list[Path]:
    """HANDOVER.md and grafana-dashboard.json in the delivery folder."""
    text = delivery / "HANDOVER.md"
    text.write_text(credentials_text(loaded))
    dashboard = delivery / "grafana-dashboard.json"
    dashboard.write_text(json.dumps(grafana_dashboard(loaded), indent=2) + "\n")
    return [text, dashboard]
