#!/bin/sh
# edge-agent: one-file launcher of the frozen agent (written by packaging/build_agent.py).
#
# Why not PyInstaller's one-file mode: its bootloader unpacks ~30 MB into $TMPDIR on every
# start and deletes it at exit (RAM when /tmp is a tmpfs, charged to the service, paid again
# on each restart). This file carries PyInstaller's one-dir build as a gzip'ed tar after a
# fixed-size header; the tar is unpacked ONCE into a private directory on disk and reused
# while it is intact. Needs only POSIX sh, tail, tar (gzip), sha256sum, find, stat, sort,
# cmp, mktemp and flock (coreutils/util-linux or busybox).
#
# Runtime dir (first that applies): $EDGE_AGENT_RUNTIME_DIR; <data dir>/runtime with the data
# dir from --data-dir or $EDGE_AGENT_DATA_DIR; /var/lib/edge-agent/runtime when that data dir
# is ours; else ${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent. Inside it:
#   <version>/            the one-dir build of this binary (<version> = payload sha256 prefix)
#   <version>/.manifest   type, size, mode, owner, mtime of every file, taken at extraction
#   .lock                 serialises extraction and clean-up between concurrent starts
# Rules: the runtime dir must be ours and writable by nobody else (else: refuse to run); a
# version dir is used only when it matches its manifest (else: unpacked again); unpacking
# goes to .new.XXXXXX, is checked against the payload's sha256 and renamed into place; other
# versions and interrupted unpacks are removed unless a running agent holds them (a shared
# flock on their .manifest, kept open by the agent through exec).
set -eu
payload_sha256=@PAYLOAD_SHA256@
version=@VERSION@
header_bytes=@HEADER_BYTES@
self=$0

die() { printf 'edge-agent: %s\n' "$*" >&2; exit 1; }

pick_root() {
    if [ -n "${EDGE_AGENT_RUNTIME_DIR:-}" ]; then root=$EDGE_AGENT_RUNTIME_DIR; return; fi
    data= prev=
    for arg in "$@"; do
        case $prev in --data-dir) data=$arg ;; esac
        case $arg in --data-dir=*) data=${arg#--data-dir=} ;; esac
        prev=$arg
    done
    [ -n "$data" ] || data=${EDGE_AGENT_DATA_DIR:-}
    if [ -z "$data" ] && [ -d /var/lib/edge-agent ] && [ -O /var/lib/edge-agent ]; then
        data=/var/lib/edge-agent
    fi
    if [ -n "$data" ]; then root=$data/runtime; return; fi
    [ -n "${XDG_CACHE_HOME:-}${HOME:-}" ] || die "no runtime dir: set EDGE_AGENT_RUNTIME_DIR to a private directory on disk"
    root=${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent
}

check_root() {  # the dir we execute from: ours, writable by nobody else; its parent too (or sticky)
    [ -d "$root" ] || (umask 077 && mkdir -p "$root") || die "cannot create runtime dir $root: set EDGE_AGENT_RUNTIME_DIR to a writable private directory"
    [ ! -L "$root" ] || die "runtime dir $root is a symlink: point EDGE_AGENT_RUNTIME_DIR at the real directory"
    root=$(cd -P "$root" && pwd -P)
    [ -O "$root" ] || die "runtime dir $root is not owned by uid $(id -u): chown it, or set EDGE_AGENT_RUNTIME_DIR to a private directory"
    # shellcheck disable=SC2046
    set -- $(LC_ALL=C stat -c '%u %a' "$root" "$root/..")
    [ $(( 0$2 & 022 )) -eq 0 ] || die "runtime dir $root is writable by group/others (mode $2): chmod 700 $root, or set EDGE_AGENT_RUNTIME_DIR to a private directory"
    if [ "$3" != "$1" ] && [ "$3" != 0 ]; then die "the parent of runtime dir $root belongs to uid $3: use a directory under one of yours"; fi
    if [ $(( 0$4 & 022 )) -ne 0 ] && [ $(( 0$4 & 01000 )) -eq 0 ]; then
        die "the parent of runtime dir $root is writable by group/others (mode $4): chmod go-w it, or use another directory"
    fi
}

listing() {  # what .manifest records: every entry but the manifest itself, sorted
    (cd "$1" && LC_ALL=C find . ! -path . ! -name .manifest -exec stat -c '%n|%F|%s|%a|%u|%Y' {} + | LC_ALL=C sort)
}

intact() {  # $1: a version dir matching its manifest (no file added, lost, resized, touched, chmod'ed)
    [ -f "$1/.manifest" ] && [ -x "$1/edge-agent" ] && listing "$1" | cmp -s - "$1/.manifest"
}

have_flock() { command -v flock >/dev/null 2>&1; }

clean_stale() {  # under the root lock: other versions not held by a running agent, broken unpacks
    have_flock || return 0
    for d in "$root"/* "$root"/.new.*; do
        [ -e "$d" ] && [ "$d" != "$vdir" ] || continue
        if [ -f "$d/.manifest" ]; then
            (exec 7<"$d/.manifest" && flock -x -n 7 && rm -rf "$d") || true
        else
            rm -rf "$d"
        fi
    done
}

unpack() {
    have_flock || printf 'edge-agent: warning: no flock(1); concurrent starts are not serialised\n' >&2
    exec 9>"$root/.lock"
    if have_flock; then flock -x 9 || die "cannot lock $root/.lock (flock failed)"; fi
    if ! intact "$vdir"; then
        rm -rf "$vdir"
        got=$(tail -c +$((header_bytes + 1)) "$self" | sha256sum)
        [ "${got%% *}" = "$payload_sha256" ] || die "$self is damaged (payload sha256 ${got%% *}, built as $payload_sha256): reinstall it"
        tmp=$(umask 077 && mktemp -d "$root/.new.XXXXXX")
        tail -c +$((header_bytes + 1)) "$self" | (umask 077 && tar -xzof - -C "$tmp") \
            || die "unpacking $self into $tmp failed (disk full?): free space under $root"
        listing "$tmp" >"$tmp/.manifest"
        sync
        mv "$tmp" "$vdir"
    fi
    clean_stale
    exec 9>&-
}

hold() {  # shared lock on this version (fd 8, inherited through exec: see the header), then check it
    [ -f "$vdir/.manifest" ] || return 1
    exec 8<"$vdir/.manifest"
    if have_flock; then flock -s 8 || die "cannot lock $vdir/.manifest (flock failed)"; fi
    intact "$vdir"
}

pick_root "$@"
check_root
vdir=$root/$version
if hold; then
    for d in "$root"/* "$root"/.new.*; do  # stale entries left by an upgrade: clean them now
        if [ -e "$d" ] && [ "$d" != "$vdir" ]; then
            exec 9>"$root/.lock"
            if have_flock && flock -x -n 9; then clean_stale; fi
            exec 9>&-
            break
        fi
    done
else
    exec 8<&-
    unpack
    hold || die "runtime dir $vdir changed while starting: start again"
fi
exec "$vdir/edge-agent" "$@"
