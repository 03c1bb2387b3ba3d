# Sourced (not run) by scripts/test.sh: the headless Chromium the playground's browser
# tests drive (crates/remixd/tests/integration/playground.rs). Installs Debian's
# `chromium` package when no Chromium is found and REMIXD_TEST_CHROMIUM names none.

chromium_ensure() {
  if [[ -n "${REMIXD_TEST_CHROMIUM:-}" ]] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
    return 0
  fi
  echo "== installing Chromium (Debian's chromium package)" >&2
  local sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null ||
    { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } ||
    { echo "error: could not install Chromium" >&2; return 1; }
}
