//! Path rules shared by the export jail (server) and destination naming
//! (client). These checks are purely lexical; the server additionally resolves
//! the path beneath its export root so symlinks cannot lead out.

use crate::proto::MAX_PATH;

/// Why a remote path is refused before touching the file system.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// No bytes at all (a path or a `-O` name).
    #[error("path is empty")]
    Empty,
    /// Over [`MAX_PATH`] bytes, the protocol's limit.
    #[error("path is longer than {MAX_PATH} bytes")]
    TooLong,
    /// Starts with `/`; remote paths are relative to the export root.
    #[error("path is absolute; paths are relative to the export directory")]
    Absolute,
    /// A `..` component, which could climb out of the export root or the download directory.
    #[error("path contains a `..` component")]
    DotDot,
    /// A NUL byte, where system calls would cut the path short.
    #[error("path contains a NUL byte")]
    Nul,
    /// A `\`, a separator elsewhere (`..\x`): refused rather than taken as part of a name.
    #[error("path contains a backslash")]
    Backslash,
    /// A control character other than NUL (newline, escape, DEL…).
    #[error("path contains a control character")]
    Control,
    /// Ends in `/` or has only `.` and empty components: no file is named.
    #[error("path names a directory, not a file")]
    NotAFile,
    /// A `-O` name with a `/`: it must be one component, in the download directory.
    #[error("a file name cannot contain `/`")]
    Slash,
    /// A `-O` name ending in `.mftpart`, which could collide with another download's partial file.
    #[error("a file name cannot end in `.mftpart` (mftd's partial files)")]
    PartSuffix,
    /// A `-O` name over 255 bytes, the usual file system limit for one component.
    #[error("a file name cannot be longer than 255 bytes")]
    NameTooLong,
}

/// Checks a name given for the downloaded file (`get -O NAME`): one path
/// component, not `.`/`..`, no control characters, and not a name mftd's
/// own partial files use.
pub fn output_name(name: &str) -> Result<String, PathError> {
    if name.contains('/') {
        return Err(PathError::Slash);
    }
    if name.len() > 255 {
        return Err(PathError::NameTooLong);
    }
    let checked = normalize_remote(name)?;
    if checked.ends_with(".mftpart") {
        return Err(PathError::PartSuffix);
    }
    Ok(checked)
}

/// The file name a download is saved under: `output` if given (checked by
/// [`output_name`]), else the last component of `remote`.
pub fn destination_name(remote: &str, output: Option<&str>) -> Result<String, PathError> {
    match output {
        Some(o) => output_name(o),
        None => local_name(remote),
    }
}

/// Checks a remote path and returns it with empty and `.` components removed
/// (`a//./b` becomes `a/b`).
pub fn normalize_remote(path: &str) -> Result<String, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    if path.chars().any(char::is_control) {
        return Err(PathError::Control);
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(PathError::DotDot),
            p => parts.push(p),
        }
    }
    if parts.is_empty() || path.ends_with('/') {
        return Err(PathError::NotAFile);
    }
    Ok(parts.join("/"))
}

/// The local file name a download of `remote` is saved under: the last
/// component of the checked remote path. It can never contain a `/` or be
/// `.`/`..`, so joining it to the output directory stays inside it.
pub fn local_name(remote: &str) -> Result<String, PathError> {
    let norm = normalize_remote(remote)?;
    let name = norm.rsplit('/').next().unwrap_or(&norm).to_string();
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalizes() {
        assert_eq!(normalize_remote("a.bin").unwrap(), "a.bin");
        assert_eq!(normalize_remote("dir/./sub//f").unwrap(), "dir/sub/f");
        assert_eq!(normalize_remote("..hidden").unwrap(), "..hidden");
        assert_eq!(normalize_remote("ünïcode/ファイル").unwrap(), "ünïcode/ファイル");
    }

    #[test]
    fn rejects_every_bad_form() {
        let long = "a".repeat(MAX_PATH + 1);
        let cases: &[(&str, PathError)] = &[
            ("", PathError::Empty),
            (&long, PathError::TooLong),
            ("/etc/passwd", PathError::Absolute),
            ("../x", PathError::DotDot),
            ("a/../../x", PathError::DotDot),
            ("a/..", PathError::DotDot),
            ("a\0b", PathError::Nul),
            ("a\\..\\b", PathError::Backslash),
            ("a\nb", PathError::Control),
            (".", PathError::NotAFile),
            ("dir/", PathError::NotAFile),
            ("//", PathError::Absolute),
        ];
        for (p, want) in cases {
            assert_eq!(normalize_remote(p).as_ref(), Err(want), "path {p:?}");
        }
    }

    #[test]
    fn output_names_are_one_safe_component() {
        assert_eq!(output_name("my.iso").unwrap(), "my.iso");
        assert_eq!(output_name("a/b"), Err(PathError::Slash));
        assert_eq!(output_name(".."), Err(PathError::DotDot));
        assert_eq!(output_name("."), Err(PathError::NotAFile));
        assert_eq!(output_name(""), Err(PathError::Empty));
        assert_eq!(output_name("x.mftpart"), Err(PathError::PartSuffix));
        assert_eq!(output_name("a\nb"), Err(PathError::Control));
        assert_eq!(output_name(&"n".repeat(256)), Err(PathError::NameTooLong));
        assert_eq!(destination_name("dir/f", None).unwrap(), "f");
        assert_eq!(destination_name("dir/f", Some("g")).unwrap(), "g");
    }

    #[test]
    fn local_name_is_last_component() {
        assert_eq!(local_name("iso/big.iso").unwrap(), "big.iso");
        assert_eq!(local_name("big.iso").unwrap(), "big.iso");
        assert!(local_name("../../.ssh/authorized_keys").is_err());
    }
}
