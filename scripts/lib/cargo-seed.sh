# shellcheck shell=bash
# The crates.io dependencies' build outputs, kept between checkouts (sourced by scripts/setup).
#
# A fresh clone has no target/, so its first build compiles every dependency again: about
# 40 of setup's 90 s in a warm CI run, for artifacts that only change with Cargo.lock, the
# toolchain or the flags. After a build, cargo_seed_save copies the artifacts that belong to no
# workspace crate to ${TERMLAB_CACHE:-/var/cache/termlab}/cargo-deps/<profile dir>/<key>;
# before a build into a directory that has none yet, cargo_seed_restore copies the newest
# seed back. cargo's own fingerprints still decide what is fresh: a seed from another
# Cargo.lock or toolchain is simply not used, and the workspace crates are always built
# from this checkout's sources (their artifacts are never in a seed).

cargo_seed_root() { echo "${TERMLAB_CACHE:-/var/cache/termlab}/cargo-deps"; }

# What makes a seed reusable as a whole: the lock file, the toolchain, the flags, the
# profile settings; and the layout, whose version 2 keeps the static agent's host artifacts
# in the release seed (an older agent seed, made without them, holds target artifacts older
# than those, which cargo therefore built again every time).
cargo_seed_key() { # repo
    {
        echo "seed layout 2"
        cat "$1/Cargo.lock"
        sed -n '/^\[profile/,$p' "$1/Cargo.toml"
        rustc -vV
        echo "RUSTFLAGS=${RUSTFLAGS:-}"
    } | sha256sum | cut -c1-16
}

# The names (crate-hash) of the artifacts in DIR/deps that a workspace crate made: cargo
# writes their sources as paths relative to the workspace in the dep-info files, and those
# of registry crates as absolute paths.
cargo_seed_workspace_stems() { # dir
    local d
    for d in "$1"/deps/*.d; do
        [[ -e $d ]] || continue
        if sed -n '1s/^[^:]*://p' "$d" | tr ' ' '\n' | grep -q '^[^/]'; then
            d="${d##*/}"
            echo "${d%.d}"
        fi
    done
}

cargo_seed_restore() { # repo profile-dir (relative to target/, e.g. release)
    local dir="$1/target/$2" seeds newest
    seeds="$(cargo_seed_root)/${2//\//_}"
    [[ ! -d $dir/deps ]] || return 0
    newest="$(ls -1t "$seeds" 2>/dev/null | grep -v '^\.' | head -1 || true)"
    [[ -n $newest ]] || return 0
    mkdir -p "$dir"
    cp -a "$seeds/$newest/." "$dir/"
    echo "[setup] cargo: dependencies' artifacts from $seeds/$newest" >&2
}

# The artifacts in DIR that belong to no workspace crate, as paths relative to DIR.
cargo_seed_dependency_files() { # dir
    local dir="$1" file stem
    local -A workspace=()
    while read -r stem; do workspace[$stem]=1; done < <(cargo_seed_workspace_stems "$dir")
    for file in "$dir"/deps/*; do
        stem="${file##*/}"
        stem="${stem%.*}"
        [[ ${file##*/} == *.d ]] || [[ ${file##*/} != lib* ]] || stem="${stem#lib}"
        [[ -n ${workspace[$stem]:-} ]] || echo "deps/${file##*/}"
    done
    # Build scripts' outputs and fingerprints are named after the package: the workspace's
    # packages are all termlab*.
    for file in "$dir"/build/* "$dir"/.fingerprint/*; do
        [[ -e $file && ${file##*/} != termlab* ]] || continue
        echo "${file#"$dir"/}"
    done
}

# A seed that exists already is topped up with what it lacks: a later build into the same
# directory made more (the static agent's build scripts and proc macros, built for the host
# into target/release; clippy's checks of the dependencies), which the next checkout would
# otherwise build again.
cargo_seed_save() { # repo profile-dir
    local dir="$1/target/$2" seeds key tmp file added=0
    seeds="$(cargo_seed_root)/${2//\//_}"
    key="$(cargo_seed_key "$1")"
    [[ -d $dir/deps ]] || return 0
    if [[ -d $seeds/$key ]]; then
        while read -r file; do
            [[ ! -e $seeds/$key/$file ]] || continue
            cp -a "$dir/$file" "$seeds/$key/$file"
            added=$((added + 1))
        done < <(cargo_seed_dependency_files "$dir")
        ((added == 0)) || echo "[setup] cargo: $added more dependency artifacts kept in $seeds/$key" >&2
        return 0
    fi
    mkdir -p "$seeds"
    tmp="$(mktemp -d "$seeds/.new.XXXXXX")"
    mkdir "$tmp/deps" "$tmp/build" "$tmp/.fingerprint"
    while read -r file; do
        cp -a "$dir/$file" "$tmp/$file"
    done < <(cargo_seed_dependency_files "$dir")
    # Only the newest seed is kept: an older one has nothing the new one lacks that a build
    # of this checkout would use.
    find "$seeds" -mindepth 1 -maxdepth 1 -not -path "$tmp" -exec rm -rf {} +
    # Another setup may have saved the same key meanwhile: keep that one.
    mv -T "$tmp" "$seeds/$key" 2>/dev/null || { rm -rf "$tmp"; return 0; }
    echo "[setup] cargo: dependencies' artifacts kept in $seeds/$key for the next checkout" >&2
}
