#!/usr/bin/env bash
# Installs what tests/console_browser.rs drives: Debian's Chromium and its
# ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver). Browsers that
# download themselves cannot be fetched here, so the test uses only these.
# Installs only what is missing, so a second run takes a moment.
set -euo pipefail

say() { echo "browser-setup: $*" >&2; }

missing=()
for p in chromium chromium-driver; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  say "chromium and chromedriver present"
  exit 0
fi
command -v apt-get >/dev/null || {
  say "no apt-get: install ${missing[*]} with your package manager (the test looks for /usr/bin/chromium and /usr/bin/chromedriver, or \$HERALD_CHROMIUM and \$HERALD_CHROMEDRIVER)"
  exit 1
}
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
say "installing ${missing[*]} (about a minute)"
# Wait for another apt run (broker4's chroot set-up, producers-setup) rather than fail.
$sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
  --no-install-recommends "${missing[@]}" >/dev/null
say "ready: $(chromium --version 2>/dev/null || echo chromium), $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
