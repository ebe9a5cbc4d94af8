//! Root mode's copy of `mesh-proxy`: the proxies run as their own uid (2102), which often
//! cannot reach the binary where it was built (a checkout in a 0700 home or `mktemp -d`
//! folder), so `up` copies it into the state folder and the pods run the copy. Every folder
//! on the way to the copy must let that uid through; [`first_closed_folder`] says which one
//! does not, so `up` fails naming it instead of the proxy failing with a bare
//! "Permission denied".

use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Where the copy lives in a state folder.
pub fn proxy_copy_path(state_dir: &Path) -> PathBuf {
    state_dir.join("bin").join("mesh-proxy")
}

/// Copies `source` to `copy` (see [`proxy_copy_path`]), executable by everyone.
pub fn install_copy(source: &Path, copy: &Path) -> io::Result<()> {
    if let Some(dir) = copy.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::copy(source, copy)?;
    std::fs::set_permissions(copy, std::fs::Permissions::from_mode(0o755))
}

/// A folder's owner, group and mode bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub owner: u32,
    pub group: u32,
    pub mode: u32,
}

impl Access {
    /// Of a file or folder on disk.
    pub fn of(path: &Path) -> io::Result<Access> {
        let metadata = std::fs::metadata(path)?;
        Ok(Access {
            owner: metadata.uid(),
            group: metadata.gid(),
            mode: metadata.mode(),
        })
    }

    /// Whether a process of `uid` and only group `gid` may search (enter) it: the owner's,
    /// else the group's, else the others' execute bit decides (root passes regardless).
    pub fn lets_through(&self, uid: u32, gid: u32) -> bool {
        let bit = if uid == 0 {
            return true;
        } else if self.owner == uid {
            0o100
        } else if self.group == gid {
            0o010
        } else {
            0o001
        };
        self.mode & bit != 0
    }
}

/// The outermost folder on the way to `path` that `uid` (group `gid`) cannot enter, with its
/// mode; `None` when all let it through. A folder whose metadata cannot be read counts as
/// closed (mode 0).
pub fn first_closed_folder(
    path: &Path,
    uid: u32,
    gid: u32,
    access: impl Fn(&Path) -> io::Result<Access>,
) -> Option<(PathBuf, u32)> {
    let mut folders: Vec<&Path> = path.ancestors().skip(1).collect();
    folders.reverse();
    folders
        .into_iter()
        .filter(|folder| !folder.as_os_str().is_empty())
        .find_map(|folder| match access(folder) {
            Ok(access) if access.lets_through(uid, gid) => None,
            Ok(access) => Some((folder.to_owned(), access.mode & 0o7777)),
            Err(_) => Some((folder.to_owned(), 0)),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROXY: u32 = 2102;

    /// Folders on the way: path, owner (and group), mode.
    type Folders<'a> = &'a [(&'a str, u32, u32)];

    fn folders(table: Folders<'_>) -> impl Fn(&Path) -> io::Result<Access> {
        let table: Vec<(PathBuf, Access)> = table
            .iter()
            .map(|(path, owner, mode)| {
                (
                    PathBuf::from(path),
                    Access {
                        owner: *owner,
                        group: *owner,
                        mode: *mode,
                    },
                )
            })
            .collect();
        move |path: &Path| {
            table
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, access)| *access)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    #[test]
    fn the_first_folder_the_proxy_cannot_enter_is_named() {
        let copy = Path::new("/tmp/tmp.abc/state/bin/mesh-proxy");
        let cases: &[(Folders<'_>, Option<(&str, u32)>)] = &[
            // `mktemp -d` as root: 0700 root.
            (
                &[
                    ("/", 0, 0o755),
                    ("/tmp", 0, 0o1777),
                    ("/tmp/tmp.abc", 0, 0o700),
                    ("/tmp/tmp.abc/state", 0, 0o755),
                    ("/tmp/tmp.abc/state/bin", 0, 0o755),
                ],
                Some(("/tmp/tmp.abc", 0o700)),
            ),
            // Traversable without being listable is enough.
            (
                &[
                    ("/", 0, 0o755),
                    ("/tmp", 0, 0o1777),
                    ("/tmp/tmp.abc", 0, 0o711),
                    ("/tmp/tmp.abc/state", 0, 0o711),
                    ("/tmp/tmp.abc/state/bin", 0, 0o755),
                ],
                None,
            ),
            // The proxy's own folder, closed to others but not to it.
            (
                &[
                    ("/", 0, 0o755),
                    ("/tmp", 0, 0o1777),
                    ("/tmp/tmp.abc", PROXY, 0o700),
                    ("/tmp/tmp.abc/state", 0, 0o755),
                    ("/tmp/tmp.abc/state/bin", 0, 0o755),
                ],
                None,
            ),
            // Group access for its group only: 2102 is not in root's group.
            (
                &[
                    ("/", 0, 0o755),
                    ("/tmp", 0, 0o1777),
                    ("/tmp/tmp.abc", 0, 0o750),
                    ("/tmp/tmp.abc/state", 0, 0o755),
                    ("/tmp/tmp.abc/state/bin", 0, 0o755),
                ],
                Some(("/tmp/tmp.abc", 0o750)),
            ),
            // A folder that cannot be inspected is reported, not assumed open.
            (
                &[("/", 0, 0o755), ("/tmp", 0, 0o1777)],
                Some(("/tmp/tmp.abc", 0)),
            ),
        ];
        for (table, expected) in cases {
            let closed = first_closed_folder(copy, PROXY, PROXY, folders(table));
            let expected = expected.map(|(path, mode)| (PathBuf::from(path), mode));
            assert_eq!(closed, expected, "{table:?}");
        }
    }

    #[test]
    fn root_passes_everywhere() {
        let closed = first_closed_folder(
            Path::new("/secret/bin/mesh-proxy"),
            0,
            0,
            folders(&[
                ("/", 0, 0o700),
                ("/secret", 5, 0o000),
                ("/secret/bin", 5, 0),
            ]),
        );
        assert_eq!(closed, None);
    }

    #[test]
    fn a_real_private_folder_is_found_and_the_copy_is_executable_by_anyone() {
        let private = std::env::temp_dir().join(format!("mesh-binary-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&private);
        std::fs::create_dir_all(&private).expect("create");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let source = private.join("mesh-proxy-built");
        std::fs::write(&source, b"#!/bin/sh\n").expect("write");
        let copy = proxy_copy_path(&private.join("state"));
        install_copy(&source, &copy).expect("copied");
        let owner = Access::of(&private).expect("metadata").owner;
        let other = if owner == PROXY { PROXY + 1 } else { PROXY };
        assert_eq!(
            first_closed_folder(&copy, other, other, Access::of),
            Some((private.clone(), 0o700))
        );
        assert_eq!(Access::of(&copy).expect("metadata").mode & 0o777, 0o755);
        assert_eq!(
            Access::of(copy.parent().expect("bin"))
                .expect("metadata")
                .mode
                & 0o777,
            0o755
        );
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        // The rest of the way (the temporary folder's own parents) is the machine's business.
        let closed = first_closed_folder(&copy, other, other, Access::of);
        assert!(
            closed
                .as_ref()
                .is_none_or(|(folder, _)| !folder.starts_with(&private)),
            "{closed:?}"
        );
        let _ = std::fs::remove_dir_all(&private);
    }
}
