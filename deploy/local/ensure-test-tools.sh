#!/usr/bin/env bash
# Make sure the tools the connected checks need are here. kubectl (for the kustomize overlays):
# say how to get it when it is missing. And the system python can run the test RTSP camera
# (libs/common/src/edgeway/common/testing/rtsp_server.py): PyGObject, GstRtspServer and the
# GStreamer plugins its pipelines use (videotestsrc, videoscale, x264enc, rtph264pay).
# Installs them with apt-get when missing; does nothing when they are there.
set -euo pipefail

python=/usr/bin/python3
packages=(
  python3-gi
  gir1.2-gst-rtsp-server-1.0
  gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good
  gstreamer1.0-plugins-ugly
)

have_tools() {
  [ -x "$python" ] && "$python" - <<'PY' >/dev/null 2>&1
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
for name in ("videotestsrc", "videoscale", "videoconvert", "x264enc", "rtph264pay"):
    assert Gst.ElementFactory.find(name) is not None, name
PY
}

# The Kubernetes overlays are rendered with `kubectl kustomize` (kustomize v5: `labels`,
# `patches` with targets). No registry this machine reaches carries it, so say how to get it.
if ! command -v kubectl >/dev/null 2>&1 || ! kubectl kustomize --help >/dev/null 2>&1; then
  cat >&2 <<MSG
The deployment checks render deploy/k8s with 'kubectl kustomize' (kustomize v5), and kubectl is
not on PATH. Install kubectl 1.27 or newer: https://kubernetes.io/docs/tasks/tools/
(Debian's kubernetes-client package carries kubectl 1.20, whose kustomize is too old.)
MSG
  exit 1
fi

# The web console's browser tests (tests/test_console.py) drive Debian's Chromium with
# playwright-core (whose own browser download cannot work here): install it when it is missing.
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }; then
    as_root=()
    [ "$(id -u)" = 0 ] || as_root=(sudo)
    echo "Installing Chromium for the web console's browser tests"
    ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
      || { ${as_root[@]+"${as_root[@]}"} apt-get update && ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }
  fi
  if [ ! -x /usr/bin/chromium ]; then
    echo "The web console's browser tests need Chromium at /usr/bin/chromium: as root, run: apt-get install -y chromium" >&2
    exit 1
  fi
fi

have_tools && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  cat >&2 <<MSG
The test RTSP server needs GStreamer's RTSP server and PyGObject in $python, and this machine has
no apt-get. Install the equivalents of: ${packages[*]}
  macOS: brew install gst-rtsp-server gst-plugins-good gst-plugins-ugly pygobject3
MSG
  exit 1
fi

sudo=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "Not root and no sudo: as root, run: apt-get install -y ${packages[*]}" >&2
    exit 1
  fi
fi

install() {
  ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
}

echo "Installing the test RTSP server's packages: ${packages[*]}"
# The package lists may be stale or absent (fresh containers): refresh them only if needed.
if ! install; then
  ${sudo[@]+"${sudo[@]}"} apt-get update
  install
fi

if ! have_tools; then
  echo "Installed ${packages[*]}, but $python still cannot load GstRtspServer and x264enc." >&2
  exit 1
fi
echo "Test RTSP server tools are ready."
