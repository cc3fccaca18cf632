//! Which logical paths belong to a group: csync2's include/exclude rules (last match wins) and the
//! checks applied to every path a peer names (no `..`, no escape from the group's include roots).
//!
//! Like csync2 there are two kinds of pattern: *path patterns* start with `/` or a `%prefix%` and
//! match the path or any of its parent directories; *basename patterns* (anything else) match a
//! single path component. In each kind the last matching rule wins; a path is synced when the path
//! patterns say include (default: exclude) and no component is excluded by a basename pattern
//! (default: include). Patterns are shell globs: `*` and `?` never match `/`, `[a-z]`/`[!x]` classes.

/// One include or exclude rule, in configuration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub include: bool,
    pub pattern: String,
}

impl Rule {
    pub fn is_path_pattern(&self) -> bool {
        is_path_pattern(&self.pattern)
    }
}

pub fn is_path_pattern(p: &str) -> bool {
    p.starts_with('/') || p.starts_with('%')
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Why a configured include, exclude or action pattern was refused: it could never match a path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("empty pattern")]
    Empty,
    #[error("pattern {0:?} contains a NUL byte")]
    Nul(String),
    #[error(
        "basename pattern {0:?} contains '/' but is matched against one file name, so it never \
         matches; start it with / or %prefix% to match a path"
    )]
    SlashInBasename(String),
    #[error("pattern {0:?} can never match: no path has an empty, `.` or `..` component")]
    BadComponent(String),
}

/// A configured pattern in the form the matchers compare: trailing slashes removed (csync2 strips
/// them too; `/etc/ssl/private/` names that directory, and matched paths never end in `/`).
/// Patterns no path can match are refused, since a silently dead exclude syncs what it was meant
/// to keep out.
pub fn normalize_pattern(pattern: &str) -> Result<String, PatternError> {
    if pattern.contains('\0') {
        return Err(PatternError::Nul(pattern.into()));
    }
    let trimmed = pattern.trim_end_matches('/');
    let p = if trimmed.is_empty() && !pattern.is_empty() {
        "/"
    } else {
        trimmed
    };
    if p.is_empty() {
        return Err(PatternError::Empty);
    }
    if is_path_pattern(p) {
        let body = p.strip_prefix('/').unwrap_or(p);
        if p != "/"
            && body
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(PatternError::BadComponent(pattern.into()));
        }
    } else if p.contains('/') {
        return Err(PatternError::SlashInBasename(pattern.into()));
    } else if p == "." || p == ".." {
        return Err(PatternError::BadComponent(pattern.into()));
    }
    Ok(p.to_string())
}

/// Whether one pattern matches `path`: a path pattern the path or one of its parent directories, a
/// basename pattern any component (the file's own name or a parent directory's).
pub fn pattern_matches(pattern: &str, path: &str) -> bool {
    if is_path_pattern(pattern) {
        ancestors(path).any(|a| glob_match(pattern, a))
    } else {
        path.split('/')
            .filter(|c| !c.is_empty())
            .any(|c| glob_match(pattern, c))
    }
}

/// Why a peer-supplied path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRejected {
    #[error("empty path")]
    Empty,
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path {0:?} is not absolute or prefix-based")]
    Relative(String),
    #[error("path {0:?} has an empty, `.` or `..` component")]
    BadComponent(String),
    #[error("path {0:?} is outside the group's includes")]
    Outside(String),
    #[error("path {0:?} is excluded in this group")]
    Excluded(String),
}

/// The compiled include/exclude rules of one group.
#[derive(Debug, Clone)]
pub struct Filter {
    rules: Vec<Rule>,
}

impl Filter {
    pub fn new(rules: Vec<Rule>) -> Filter {
        Filter { rules }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The directories (or files) a scan starts from: the literal part of every include path pattern,
    /// without ones nested inside another root.
    pub fn roots(&self) -> Vec<String> {
        let mut roots: Vec<String> = Vec::new();
        for r in self
            .rules
            .iter()
            .filter(|r| r.include && r.is_path_pattern())
        {
            let mut lit = Vec::new();
            for c in r.pattern.split('/') {
                if has_wildcard(c) {
                    break;
                }
                lit.push(c);
            }
            let mut root = lit.join("/");
            if root.is_empty() {
                root = "/".into();
            }
            while root.len() > 1 && root.ends_with('/') {
                root.pop();
            }
            roots.push(root);
        }
        roots.sort();
        roots.dedup();
        let all = roots.clone();
        roots.retain(|r| !all.iter().any(|o| o != r && is_under(r, o)));
        roots
    }

    /// Whether the logical path is synced in this group.
    pub fn included(&self, path: &str) -> bool {
        let mut path_verdict = false;
        for r in self.rules.iter().filter(|r| r.is_path_pattern()) {
            if ancestors(path).any(|a| glob_match(&r.pattern, a)) {
                path_verdict = r.include;
            }
        }
        if !path_verdict {
            return false;
        }
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            let mut v = true;
            for r in self.rules.iter().filter(|r| !r.is_path_pattern()) {
                if glob_match(&r.pattern, comp) {
                    v = r.include;
                }
            }
            if !v {
                return false;
            }
        }
        true
    }

    /// Validates a path named by a peer: well-formed, under a root, included.
    pub fn check(&self, path: &str) -> Result<(), PathRejected> {
        check_syntax(path)?;
        if !self.roots().iter().any(|r| is_under(path, r)) {
            return Err(PathRejected::Outside(path.into()));
        }
        if !self.included(path) {
            return Err(PathRejected::Excluded(path.into()));
        }
        Ok(())
    }
}

/// Syntax of a logical path: absolute or `%prefix%`-based, no empty, `.` or `..` components.
pub fn check_syntax(path: &str) -> Result<(), PathRejected> {
    if path.is_empty() {
        return Err(PathRejected::Empty);
    }
    if path.contains('\0') {
        return Err(PathRejected::Nul(path.into()));
    }
    if !is_path_pattern(path) {
        return Err(PathRejected::Relative(path.into()));
    }
    let body = path.strip_prefix('/').unwrap_or(path);
    if path == "/" {
        return Ok(());
    }
    if body
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(PathRejected::BadComponent(path.into()));
    }
    Ok(())
}

/// `path` equals `root` or lies below it (component-wise).
pub fn is_under(path: &str, root: &str) -> bool {
    if root == "/" {
        return path.starts_with('/');
    }
    path == root || (path.starts_with(root) && path.as_bytes().get(root.len()) == Some(&b'/'))
}

/// The path itself and each parent directory, longest first (`/a/b/c`, `/a/b`, `/a`, `/`: the
/// root too, or an `include = ["/"]` would match nothing).
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut cur = Some(path);
    std::iter::from_fn(move || {
        let p = cur?;
        cur = match p.rfind('/') {
            Some(0) if p.len() > 1 => Some("/"),
            Some(0) | None => None,
            Some(i) => Some(&p[..i]),
        };
        Some(p)
    })
}

/// Shell-style glob where `*` and `?` do not match `/`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    glob_at(&p, &t)
}

fn glob_at(p: &[char], t: &[char]) -> bool {
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '?' if t[ti] != '/' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class_match(&p[pi..], t[ti]) {
                        if matched {
                            pi += next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == '[' {
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c != '?' && c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) if t[st] != '/' => {
                star = Some((sp, st + 1));
                pi = sp + 1;
                ti = st + 1;
            }
            _ => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `[...]` at the start of `p` against `c`: (matched, pattern length) or None if unterminated.
fn class_match(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(1), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate && c != '/', i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(rules: &[(bool, &str)]) -> Filter {
        Filter::new(
            rules
                .iter()
                .map(|(i, p)| Rule {
                    include: *i,
                    pattern: p.to_string(),
                })
                .collect(),
        )
    }

    #[test]
    fn globs() {
        assert!(glob_match("*~", "a.txt~"));
        assert!(!glob_match("*~", "a.txt"));
        assert!(glob_match(".*", ".git"));
        assert!(glob_match("/etc/*.conf", "/etc/a.conf"));
        assert!(!glob_match("/etc/*.conf", "/etc/x/a.conf"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "a/c"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(!glob_match("[!a-c]x", "bx"));
        assert!(glob_match("", ""));
        assert!(glob_match("*", ""));
        assert!(!glob_match("[", "x"));
        assert!(glob_match("[", "["));
    }

    #[test]
    fn last_match_wins_like_csync2() {
        let flt = f(&[
            (true, "%d%"),
            (false, "%d%/tmp"),
            (true, "%d%/tmp/keep"),
            (false, "*~"),
            (false, ".*"),
        ]);
        assert!(flt.included("%d%/a"));
        assert!(flt.included("%d%"));
        assert!(!flt.included("%d%/tmp/x"));
        assert!(flt.included("%d%/tmp/keep/x"));
        assert!(!flt.included("%d%/a~"));
        assert!(!flt.included("%d%/.git/config"));
        assert!(
            !flt.included("%e%/a"),
            "no path pattern matches: excluded by default"
        );
        let flt = f(&[(false, "*.log"), (true, "important.log"), (true, "/srv")]);
        assert!(flt.included("/srv/important.log"));
        assert!(!flt.included("/srv/other.log"));
    }

    #[test]
    fn roots_drop_nested_and_wildcards() {
        let flt = f(&[
            (true, "/etc/apache"),
            (true, "/etc/apache/sites"),
            (true, "/srv/*/www"),
            (true, "%h%/bob"),
        ]);
        assert_eq!(
            flt.roots(),
            vec!["%h%/bob".to_string(), "/etc/apache".into(), "/srv".into()]
        );
    }

    #[test]
    fn checks_peer_paths() {
        let flt = f(&[(true, "%d%"), (false, "*~")]);
        assert_eq!(flt.check("%d%/a/b"), Ok(()));
        assert!(matches!(
            flt.check("%d%/../etc/passwd"),
            Err(PathRejected::BadComponent(_))
        ));
        assert!(matches!(
            flt.check("%d%/a/./b"),
            Err(PathRejected::BadComponent(_))
        ));
        assert!(matches!(
            flt.check("%d%//b"),
            Err(PathRejected::BadComponent(_))
        ));
        assert!(matches!(
            flt.check("/etc/passwd"),
            Err(PathRejected::Outside(_))
        ));
        assert!(matches!(
            flt.check("etc/passwd"),
            Err(PathRejected::Relative(_))
        ));
        assert!(matches!(flt.check("%dx/a"), Err(PathRejected::Outside(_))));
        assert!(matches!(
            flt.check("%d%/a~"),
            Err(PathRejected::Excluded(_))
        ));
        assert!(matches!(flt.check("%d%/a\0"), Err(PathRejected::Nul(_))));
        assert!(matches!(flt.check(""), Err(PathRejected::Empty)));
    }

    #[test]
    fn patterns_are_normalized_or_refused() {
        assert_eq!(
            normalize_pattern("/etc/ssl/private/"),
            Ok("/etc/ssl/private".into())
        );
        assert_eq!(normalize_pattern("%data%/"), Ok("%data%".into()));
        assert_eq!(normalize_pattern("tmp//"), Ok("tmp".into()));
        assert_eq!(normalize_pattern("/"), Ok("/".into()));
        assert_eq!(normalize_pattern("//"), Ok("/".into()));
        assert_eq!(normalize_pattern("*.conf"), Ok("*.conf".into()));
        assert_eq!(normalize_pattern("/srv/*/www"), Ok("/srv/*/www".into()));
        assert_eq!(normalize_pattern(".*"), Ok(".*".into()));
        assert_eq!(normalize_pattern(""), Err(PatternError::Empty));
        assert_eq!(
            normalize_pattern("tmp/cache"),
            Err(PatternError::SlashInBasename("tmp/cache".into()))
        );
        assert_eq!(
            normalize_pattern("*/cache/"),
            Err(PatternError::SlashInBasename("*/cache/".into()))
        );
        for dead in ["/a//b", "/a/./b", "%d%/../x", "/a/..", ".", ".."] {
            assert_eq!(
                normalize_pattern(dead),
                Err(PatternError::BadComponent(dead.into())),
                "{dead}"
            );
        }
        assert_eq!(
            normalize_pattern("a\0"),
            Err(PatternError::Nul("a\0".into()))
        );
        assert!(
            PatternError::SlashInBasename("tmp/cache".into())
                .to_string()
                .contains("\"tmp/cache\"")
        );
    }

    #[test]
    fn directory_patterns_match_once_normalized() {
        let n = |p: &str| normalize_pattern(p).unwrap();
        let flt = f(&[
            (true, &n("/etc/")),
            (false, &n("/etc/ssl/private/")),
            (false, &n("cache/")),
        ]);
        assert!(flt.included("/etc/ssl/cert.pem"));
        assert!(!flt.included("/etc/ssl/private"));
        assert!(!flt.included("/etc/ssl/private/key.pem"));
        assert!(!flt.included("/etc/app/cache/x"));
        let everything = f(&[(true, &n("/")), (false, &n("/tmp/"))]);
        assert!(everything.included("/etc/x"));
        assert!(everything.included("/"));
        assert!(!everything.included("/tmp/x"));
        assert!(flt.check("/etc/hosts").is_ok());
        assert_eq!(flt.roots(), vec!["/etc".to_string()]);
    }

    #[test]
    fn one_pattern_matches_path_or_parent_or_component() {
        assert!(pattern_matches("%d%/nginx", "%d%/nginx/a.conf"));
        assert!(pattern_matches("%d%/nginx/*.conf", "%d%/nginx/a.conf"));
        assert!(!pattern_matches("%d%/nginx/*.conf", "%d%/other/a.conf"));
        assert!(!pattern_matches("%d%/ngin", "%d%/nginx/a.conf"));
        assert!(pattern_matches("/", "/etc/x"));
        assert!(pattern_matches("*.conf", "%d%/nginx/a.conf"));
        assert!(pattern_matches("conf.d", "/etc/conf.d/x"));
        assert!(!pattern_matches("*.conf", "%d%/nginx/a.confx"));
    }

    #[test]
    fn under() {
        assert!(is_under("/a/b", "/a"));
        assert!(is_under("/a", "/a"));
        assert!(!is_under("/ab", "/a"));
        assert!(is_under("/x", "/"));
    }
}
