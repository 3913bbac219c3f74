#!/bin/bash
# imgbuild bake: turns a stock Amazon Linux 2023 instance into the Chroma {{ chroma_version }} image.
# The same install step full-mode user-data runs, then the files a baked boot expects, then a
# clean cloud-init state so every instance of the image boots as new. Run once, as root.
set -euo pipefail

log() { echo "imgbuild-bake: $*" >&2; }

# The SSM agent starts before cloud-init ends, so Run Command can reach this instance while its
# own first boot still runs (and holds dnf's RPM lock, amazon-linux-2023 #397): let it finish.
# A first boot that reported errors is the stock image's business, not a reason to stop.
cloud-init status --wait >/dev/null || log "cloud-init reported errors on the build instance's first boot (continuing)"

install -d -m 0755 {{ script_dir }} /etc/imgbuild

# 1. docker, docker compose {{ compose_version }} (sha256-checked), {{ storage_package }}, the image.
cat > {{ script_dir }}/10-install.sh <<'IMGBUILD_EOF'
{{ install_script }}IMGBUILD_EOF
bash {{ script_dir }}/10-install.sh

# 2. The compose file and the unit, as baked-mode user-data writes them again at boot.
cat > {{ compose_path }} <<'IMGBUILD_EOF'
{{ compose_yaml }}IMGBUILD_EOF
cat > {{ unit_path }} <<'IMGBUILD_EOF'
{{ unit }}IMGBUILD_EOF
systemctl daemon-reload
# Enabled now, started at first boot only once the boot script has mounted EFS and written
# {{ env_file }} (the unit's ConditionPathExists).
systemctl enable chroma.service

# 3. Nothing of this instance's first boot carries over into the image: cloud-init's state, dnf's
# cache, and the machine id (empty, systemd makes a new one at each instance's first boot;
# AL2023's cloud-init has no `clean --machine-id`).
dnf clean all >/dev/null
rm -rf /var/cache/dnf
cloud-init clean --logs
truncate -s 0 /etc/machine-id
log "baked Chroma {{ chroma_version }} ({{ image }}) with docker compose {{ compose_version }}"
