//! Finding the overlay mount a rootfs is, from `/proc/self/mountinfo`: pure parsing, unit-tested.
//!
//! A mountinfo line is
//! `id parent major:minor root mount_point mount_options [optional fields] - fstype source super_options`,
//! with space, tab, newline and backslash in paths written as octal escapes (`\040`, ...).
//! Overlayfs shows its layers in the super options through `seq_show_option`, which also escapes
//! commas, so splitting the options on `,` before unescaping is exact. The legacy
//! `lowerdir=a:b::c` value is the string the mounter gave: layers split on `:` (`::` starts the
//! data-only layers), with `\` escaping the next character (`\:` is a colon inside a path).
//! The new mount API shows each layer on its own as `lowerdir+=path` / `datadir+=path`, unsplit.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The most of `/proc/self/mountinfo` read; a larger table is not searched (the caller falls
/// back to the tree signature).
pub(crate) const MOUNTINFO_LIMIT: u64 = 16 << 20;

/// The layers of an overlay mount.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct OverlayLayers {
    /// Lower layers, topmost first, as the kernel shows them.
    pub lower: Vec<PathBuf>,
    /// Data-only lower layers (after `::`, or `datadir+=`).
    pub data: Vec<PathBuf>,
    /// The upper layer, absent for a read-only overlay.
    pub upper: Option<PathBuf>,
    /// The other super options (`uuid=on`, `redirect_dir=...`, ...), in the kernel's order.
    pub other: Vec<OsString>,
}

/// One mount, as much of it as the overlay key needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    /// Where it is mounted (unescaped).
    pub mount_point: PathBuf,
    /// The per-mount options (`rw,relatime,idmapped`, ...).
    pub mount_options: OsString,
    /// The filesystem type.
    pub fstype: OsString,
    /// The per-superblock options, unsplit and still escaped.
    pub super_options: Vec<u8>,
}

/// Reads `/proc/self/mountinfo`, at most [`MOUNTINFO_LIMIT`] bytes. `None` if it is larger.
pub(crate) fn read_mountinfo() -> std::io::Result<Option<Vec<u8>>> {
    let file = std::fs::File::open("/proc/self/mountinfo")?;
    let mut buf = Vec::with_capacity(64 << 10);
    file.take(MOUNTINFO_LIMIT + 1).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= MOUNTINFO_LIMIT).then_some(buf))
}

/// The topmost mount whose mount point is `path` (the last such line: later mounts cover earlier
/// ones on the same point).
pub(crate) fn find_mount(table: &[u8], path: &Path) -> Option<Mount> {
    table
        .split(|&b| b == b'\n')
        .rev()
        .filter_map(parse_line)
        .find(|m| m.mount_point == path)
}

/// Parses one mountinfo line; `None` for a malformed one.
pub(crate) fn parse_line(line: &[u8]) -> Option<Mount> {
    let mut fields = line.split(|&b| b == b' ');
    let _id = fields.next()?;
    let _parent = fields.next()?;
    let _dev = fields.next()?;
    let _root = fields.next()?;
    let mount_point = fields.next()?;
    let mount_options = fields.next()?;
    // Optional fields (`shared:1`, ...) up to the lone `-`.
    fields.by_ref().find(|f| *f == b"-")?;
    let fstype = fields.next()?;
    let _source = fields.next()?;
    let super_options = fields.next().unwrap_or_default();
    Some(Mount {
        mount_point: PathBuf::from(OsString::from_vec(unescape_octal(mount_point))),
        mount_options: OsString::from_vec(unescape_octal(mount_options)),
        fstype: OsString::from_vec(unescape_octal(fstype)),
        super_options: super_options.to_vec(),
    })
}

/// Undoes the kernel's `\ooo` octal escapes; any other backslash is kept as it is.
pub(crate) fn unescape_octal(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\'
            && i + 3 < s.len()
            && s[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = s[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Splits overlayfs's legacy `lowerdir=` value: `:` separates layers, `::` starts the data-only
/// layers, `\` escapes the next character. Returns (lower, data).
pub(crate) fn split_lowerdir(value: &[u8]) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut lower = Vec::new();
    let mut data = Vec::new();
    let mut in_data = false;
    let mut cur = Vec::new();
    let mut empty_run = false;
    let mut iter = value.iter().copied();
    let mut push = |cur: &mut Vec<u8>, in_data: bool| {
        let p = PathBuf::from(OsString::from_vec(std::mem::take(cur)));
        if in_data { data.push(p) } else { lower.push(p) }
    };
    while let Some(c) = iter.next() {
        match c {
            b'\\' => {
                if let Some(n) = iter.next() {
                    cur.push(n);
                }
                empty_run = false;
            }
            b':' => {
                if cur.is_empty() {
                    // An empty layer: the second colon of `::`.
                    if !empty_run {
                        in_data = true;
                    }
                    empty_run = true;
                } else {
                    push(&mut cur, in_data);
                    empty_run = false;
                }
            }
            _ => {
                cur.push(c);
                empty_run = false;
            }
        }
    }
    if !cur.is_empty() {
        push(&mut cur, in_data);
    }
    (lower, data)
}

/// The layers named by an overlay mount's super options.
pub(crate) fn overlay_layers(super_options: &[u8]) -> OverlayLayers {
    let mut layers = OverlayLayers::default();
    for opt in super_options.split(|&b| b == b',') {
        let (name, value) = match opt.iter().position(|&b| b == b'=') {
            Some(eq) => (&opt[..eq], Some(unescape_octal(&opt[eq + 1..]))),
            None => (opt, None),
        };
        let path = |v: Vec<u8>| PathBuf::from(OsString::from_vec(v));
        match (name, value) {
            (b"lowerdir", Some(v)) => {
                let (lower, data) = split_lowerdir(&v);
                layers.lower.extend(lower);
                layers.data.extend(data);
            }
            (b"lowerdir+", Some(v)) => layers.lower.push(path(v)),
            (b"datadir+", Some(v)) => layers.data.push(path(v)),
            (b"upperdir", Some(v)) => layers.upper = Some(path(v)),
            // The work dir changes nothing that is seen.
            (b"workdir", _) => {}
            (_, _) if opt.is_empty() => {}
            _ => layers.other.push(OsString::from_vec(unescape_octal(opt))),
        }
    }
    layers
}

/// True if `p` is absolute (mountinfo shows layer paths as the mounter gave them).
pub(crate) fn all_absolute(layers: &OverlayLayers) -> bool {
    layers
        .lower
        .iter()
        .chain(&layers.data)
        .chain(&layers.upper)
        .all(|p| p.as_os_str().as_bytes().first() == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn test_unescape_octal_space_tab_backslash_decoded() {
        assert_eq!(unescape_octal(br"/a\040b\011c\134d"), b"/a b\tc\\d");
        // Not an octal escape: kept.
        assert_eq!(unescape_octal(br"/a\:b\09"), br"/a\:b\09");
        assert_eq!(unescape_octal(br"\04"), br"\04");
    }

    #[test]
    fn test_split_lowerdir_escaped_colon_and_data_layers() {
        let (lower, data) = split_lowerdir(br"/l/1:/l/a\:b:/l/3");
        assert_eq!(lower, vec![pb("/l/1"), pb("/l/a:b"), pb("/l/3")]);
        assert!(data.is_empty());
        let (lower, data) = split_lowerdir(br"/l/1:/l/2::/d/1:/d/2");
        assert_eq!(lower, vec![pb("/l/1"), pb("/l/2")]);
        assert_eq!(data, vec![pb("/d/1"), pb("/d/2")]);
        let (lower, _) = split_lowerdir(br"/l/back\\slash");
        assert_eq!(lower, vec![pb(r"/l/back\slash")]);
    }

    #[test]
    fn test_parse_line_overlay_with_optional_fields() {
        let line = br"44 27 0:39 / /run/c/my\040root rw,relatime shared:5 master:1 - overlay overlay rw,lowerdir=/s/2/fs:/s/1/fs,upperdir=/s/3/fs,workdir=/s/3/work,uuid=on";
        let m = parse_line(line).unwrap();
        assert_eq!(m.mount_point, pb("/run/c/my root"));
        assert_eq!(m.fstype, "overlay");
        assert_eq!(m.mount_options, "rw,relatime");
        let layers = overlay_layers(&m.super_options);
        assert_eq!(layers.lower, vec![pb("/s/2/fs"), pb("/s/1/fs")]);
        assert_eq!(layers.upper, Some(pb("/s/3/fs")));
        assert!(layers.data.is_empty());
        assert_eq!(
            layers.other,
            vec![OsString::from("rw"), OsString::from("uuid=on")]
        );
        assert!(all_absolute(&layers));
    }

    #[test]
    fn test_parse_line_as_kernel_6_18_shows_colon_and_space() {
        // Mounted with lowerdir=/tmp/ovx/la\:1:/tmp/ovx/l 2 on "/tmp/ovx/m x".
        let line = br"45 27 0:39 / /tmp/ovx/m\040x rw,relatime - overlay overlay rw,lowerdir=/tmp/ovx/la\134:1:/tmp/ovx/l\0402,upperdir=/tmp/ovx/u,workdir=/tmp/ovx/w,uuid=on";
        let m = parse_line(line).unwrap();
        assert_eq!(m.mount_point, pb("/tmp/ovx/m x"));
        let layers = overlay_layers(&m.super_options);
        assert_eq!(layers.lower, vec![pb("/tmp/ovx/la:1"), pb("/tmp/ovx/l 2")]);
        assert_eq!(layers.upper, Some(pb("/tmp/ovx/u")));
    }

    #[test]
    fn test_overlay_layers_escaped_comma_and_backslash_colon() {
        // seq_show_option escapes ',' (\054) and '\' (\134) in values.
        let layers = overlay_layers(br"ro,lowerdir=/a\054b:/c\134:d,upperdir=/u\040x");
        assert_eq!(layers.lower, vec![pb("/a,b"), pb("/c:d")]);
        assert_eq!(layers.upper, Some(pb("/u x")));
    }

    #[test]
    fn test_overlay_layers_new_mount_api_form() {
        let layers = overlay_layers(
            br"rw,lowerdir+=/l/a:b,lowerdir+=/l/2,datadir+=/d/1,upperdir=/u,workdir=/w",
        );
        assert_eq!(layers.lower, vec![pb("/l/a:b"), pb("/l/2")]);
        assert_eq!(layers.data, vec![pb("/d/1")]);
        assert_eq!(layers.upper, Some(pb("/u")));
    }

    #[test]
    fn test_overlay_layers_relative_path_not_absolute() {
        let layers = overlay_layers(b"rw,lowerdir=rel:/abs");
        assert!(!all_absolute(&layers));
    }

    #[test]
    fn test_find_mount_last_line_on_the_point_wins() {
        let table = b"1 0 0:1 / / rw - ext4 /dev/vda rw\n\
            2 1 0:2 / /m rw - tmpfs tmpfs rw\n\
            3 2 0:3 / /m rw - overlay overlay rw,lowerdir=/l\n\
            garbage\n";
        let m = find_mount(table, Path::new("/m")).unwrap();
        assert_eq!(m.fstype, "overlay");
        assert!(find_mount(table, Path::new("/x")).is_none());
    }

    #[test]
    fn test_read_mountinfo_has_root() {
        let table = read_mountinfo().unwrap().unwrap();
        assert!(find_mount(&table, Path::new("/")).is_some());
    }
}
