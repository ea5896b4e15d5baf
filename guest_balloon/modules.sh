# Shared by build.sh and build_debian.sh (sourced, not run): resolving kernel
# modules in load order and staging busybox and modules into an initramfs tree.
# Needs $moddir (ROOT/lib/modules/VERSION) and a die() function.

# Append module NAME to `modules`, dependencies first, as a path relative to
# $moddir.  modules.dep lists a module's dependencies so that the last is loaded
# first.  A module built into the kernel (modules.builtin) needs nothing.
modules=()
declare -A seen=()
resolve() {
	local name=$1 line path deps i
	line=$(grep -E "^([^:]*/)?${name}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" || true)
	if [[ -z $line ]]; then
		grep -qE "(^|/)${name}\.ko$" "$moddir/modules.builtin" 2>/dev/null && return 0
		die "module $name not in $moddir/modules.dep nor modules.builtin"
	fi
	path=${line%%:*}
	[[ -z ${seen[$path]:-} ]] || return 0
	seen[$path]=1
	read -r -a deps <<<"${line#*:}"
	for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
		local dep=${deps[i]##*/}
		resolve "${dep%%.ko*}"
	done
	modules+=("$path")
}

# stage_busybox BUSYBOX STAGE: busybox and a symlink per applet.
stage_busybox() {
	local busybox=$1 stage=$2 applet
	cp "$busybox" "$stage/bin/busybox"
	while read -r applet; do
		[[ -e $stage/$applet || $applet == linuxrc ]] || ln -s /bin/busybox "$stage/$applet" 2>/dev/null || true
	done < <("$busybox" --list-full)
}

# stage_modules STAGE: the resolved `modules`, uncompressed, as STAGE/lib/modules/NAME.ko,
# and their load order in STAGE/etc/hv-modules.
stage_modules() {
	local stage=$1 m name
	for m in "${modules[@]}"; do
		name=${m##*/}
		name=${name%%.ko*}
		case "$m" in
		*.ko) cp "$moddir/$m" "$stage/lib/modules/$name.ko" ;;
		*.ko.xz) xz -dc "$moddir/$m" >"$stage/lib/modules/$name.ko" ;;
		*.ko.zst) zstd -qdc "$moddir/$m" >"$stage/lib/modules/$name.ko" ;;
		*.ko.gz) gzip -dc "$moddir/$m" >"$stage/lib/modules/$name.ko" ;;
		*) die "unknown module format: $m" ;;
		esac
		echo "$name" >>"$stage/etc/hv-modules"
	done
}
