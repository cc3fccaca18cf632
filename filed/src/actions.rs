//! Actions (csync2's `action` sections): after a sync, run each action whose patterns match a
//! changed path, once per batch, with `%%` replaced by the changed files (each quoted for the
//! shell: a file name is never run as a command); output is appended to the action's logfile (or
//! discarded).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::config::{Action, Group, Host};
use crate::filter::pattern_matches;

/// Whether an action's patterns match a logical path (the path or one of its parents; a basename
/// pattern one of its components, as in include/exclude rules).
pub fn matches(action: &Action, path: &str) -> bool {
    action.patterns.iter().any(|p| pattern_matches(p, path))
}

/// Paths an action runs for: received changes always (unless `do-local-only`), local changes sent
/// to a peer with `do-local`/`do-local-only`.
pub fn selected<'a>(
    action: &Action,
    received: &'a [String],
    sent: &'a [String],
) -> Vec<&'a String> {
    let mut out: Vec<&String> = Vec::new();
    if !action.do_local_only {
        out.extend(received.iter().filter(|p| matches(action, p)));
    }
    if action.do_local {
        out.extend(sent.iter().filter(|p| matches(action, p)));
    }
    out.sort();
    out.dedup();
    out
}

/// `exec` with `%%` replaced by `files`, each a single shell word whatever it contains (names
/// come from peers and from anyone who can create files in a synced tree).
pub fn command_line(exec: &str, files: &[String]) -> String {
    let words: Vec<String> = files.iter().map(|f| shell_quote(f)).collect();
    exec.replace("%%", &words.join(" "))
}

/// `s` as one POSIX shell word: single-quoted, each `'` written as `'\''`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs the group's actions for a finished batch (blocking until each command exits).
pub fn run_for(host: &Host, group: &Group, received: &[String], sent: &[String]) {
    for action in &group.actions {
        let paths = selected(action, received, sent);
        if paths.is_empty() {
            continue;
        }
        let phys: Vec<String> = paths
            .iter()
            .filter_map(|p| host.physical(p))
            .map(|p: PathBuf| p.display().to_string())
            .collect();
        let batches: Vec<Vec<String>> = if action.once_per_batch {
            vec![phys]
        } else {
            phys.into_iter().map(|p| vec![p]).collect()
        };
        for files in batches {
            let cmd = command_line(&action.exec, &files);
            let (out, err) = match &action.logfile {
                Some(l) => match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(l)
                {
                    Ok(f) => match f.try_clone() {
                        Ok(f2) => (Stdio::from(f), Stdio::from(f2)),
                        Err(_) => (Stdio::null(), Stdio::null()),
                    },
                    Err(e) => {
                        tracing::warn!(logfile = %l.display(), error = %e, "cannot open action logfile");
                        (Stdio::null(), Stdio::null())
                    }
                },
                None => (Stdio::null(), Stdio::null()),
            };
            match Command::new("/bin/sh")
                .arg("-c")
                .arg(&cmd)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .status()
            {
                Ok(st) if st.success() => {
                    tracing::info!(group = %group.name, command = %cmd, "action ran")
                }
                Ok(st) => {
                    tracing::warn!(group = %group.name, command = %cmd, status = %st, "action failed")
                }
                Err(e) => {
                    tracing::warn!(group = %group.name, command = %cmd, error = %e, "action could not start")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(p: &str, local: bool, only: bool) -> Action {
        Action {
            patterns: vec![p.into()],
            exec: "true".into(),
            logfile: None,
            do_local: local,
            do_local_only: only,
            once_per_batch: true,
        }
    }

    #[test]
    fn file_names_are_single_shell_words() {
        let files = vec![
            "/www/x;touch /tmp/pwned;".to_string(),
            "/www/a b".to_string(),
            "/www/it's $(id)".to_string(),
        ];
        let cmd = command_line("printf '%s\\n' %%", &files);
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&cmd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}");
        let got: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
        assert_eq!(
            got,
            files.iter().map(String::as_str).collect::<Vec<_>>(),
            "{cmd}"
        );
    }

    #[test]
    fn selection() {
        let a = action("%d%/nginx/*.conf", false, false);
        let rx = vec!["%d%/nginx/a.conf".to_string(), "%d%/other".to_string()];
        let tx = vec!["%d%/nginx/b.conf".to_string()];
        assert_eq!(selected(&a, &rx, &tx), vec![&rx[0]]);
        let a = action("%d%/nginx", true, false);
        assert_eq!(selected(&a, &rx, &tx).len(), 2);
        let a = action("%d%/nginx", true, true);
        assert_eq!(selected(&a, &rx, &tx), vec![&tx[0]]);
    }

    #[test]
    fn runs_once_per_batch_with_log() {
        let d = tempfile::tempdir().unwrap();
        let text = format!(
            "[hosts.a]\nprefix={{d=\"{0}/a\"}}\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"%d%\"]\n[[groups.g.action]]\npattern=\"%d%/*\"\nexec=\"echo ran %%\"\nlogfile=\"{0}/log\"\n",
            d.path().display()
        );
        let c = crate::config::Config::parse(&text, &d.path().join("f.toml")).unwrap();
        run_for(
            &c.hosts["a"],
            &c.groups["g"],
            &["%d%/x".into(), "%d%/y".into()],
            &[],
        );
        let log = std::fs::read_to_string(d.path().join("log")).unwrap();
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.contains("/a/x") && log.contains("/a/y"));
    }
}
