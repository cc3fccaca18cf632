//! Actions (csync2's `action` sections): after a sync, run each action whose patterns match a
//! changed path, once per batch. `%%` in the command stands for the changed files: the command runs
//! as `sh -c SCRIPT filed-action FILE...` with each `%%` replaced by `"$@"`, so a file name reaches
//! the command as one argument and is never parsed by the shell (names come from peers and from
//! anyone who can create files in a synced tree). Output is appended to the action's logfile (or
//! discarded). Commands run on a blocking thread: an action may take long.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::config::{Action, Group, Host};
use crate::filter::pattern_matches;

/// What stands for the changed files in `exec` (csync2's syntax).
const FILES_MARK: &str = "%%";

/// The files' share of one command's arguments and environment, in bytes (each name, its NUL and
/// its pointer). Linux allows at least 128 KiB (ARG_MAX is a quarter of the stack limit, never
/// less); the rest is left for the script and the environment. More files run the command again.
const FILE_ARGS_BUDGET: usize = 96 * 1024;

/// Why an action's `exec` was refused at configuration load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    #[error(
        "`%%` is quoted or escaped in {0:?}: write it unquoted; it becomes the changed files, each \
         passed as one word whatever characters it holds"
    )]
    QuotedFiles(String),
}

/// Refuses an `exec` whose `%%` stands inside quotes or after a backslash: there `"$@"` would be
/// literal text (single quotes) or split apart (double quotes) instead of one word per file.
pub fn check_exec(exec: &str) -> Result<(), ExecError> {
    #[derive(PartialEq)]
    enum Quoting {
        None,
        Single,
        Double,
    }
    let b = exec.as_bytes();
    let mut state = Quoting::None;
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(FILES_MARK.as_bytes()) {
            if state != Quoting::None {
                return Err(ExecError::QuotedFiles(exec.into()));
            }
            i += FILES_MARK.len();
            continue;
        }
        match (&state, b[i]) {
            (Quoting::None | Quoting::Double, b'\\') => {
                if b[i + 1..].starts_with(FILES_MARK.as_bytes()) {
                    return Err(ExecError::QuotedFiles(exec.into()));
                }
                // The escaped character is skipped: `\'` or `\"` opens no quote.
                i += 2;
                continue;
            }
            (Quoting::None, b'\'') => state = Quoting::Single,
            (Quoting::Single, b'\'') => state = Quoting::None,
            (Quoting::None, b'"') => state = Quoting::Double,
            (Quoting::Double, b'"') => state = Quoting::None,
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

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

/// One run of an action's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The `sh -c` script: `exec` with each `%%` replaced by `"$@"`.
    pub script: String,
    /// The positional parameters (`$1`...): this host's paths of the changed files, empty when
    /// `exec` has no `%%`.
    pub files: Vec<String>,
    pub logfile: Option<PathBuf>,
}

impl Invocation {
    /// `sh -c SCRIPT filed-action FILE...`: the names are arguments, never script text.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&self.script)
            .arg("filed-action")
            .args(&self.files);
        cmd
    }
}

/// `exec` as a script taking the files as its positional parameters.
pub fn script(exec: &str) -> String {
    exec.replace(FILES_MARK, "\"$@\"")
}

/// Splits `files` into runs whose names fit `budget` bytes of arguments (a name longer than the
/// budget gets a run of its own).
fn split_by_size(files: Vec<String>, budget: usize) -> Vec<Vec<String>> {
    let mut runs: Vec<Vec<String>> = Vec::new();
    let mut used = 0;
    for f in files {
        let cost = f.len() + 1 + std::mem::size_of::<usize>();
        match runs.last_mut() {
            Some(run) if used + cost <= budget => run.push(f),
            _ => {
                runs.push(vec![f]);
                used = 0;
            }
        }
        used += cost;
    }
    runs
}

/// The command runs for a finished batch, in action order.
pub fn invocations(
    host: &Host,
    group: &Group,
    received: &[String],
    sent: &[String],
) -> Vec<Invocation> {
    let mut out = Vec::new();
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
        let takes_files = action.exec.contains(FILES_MARK);
        let runs: Vec<Vec<String>> = if !action.once_per_batch {
            phys.into_iter().map(|p| vec![p]).collect()
        } else if takes_files {
            split_by_size(phys, FILE_ARGS_BUDGET)
        } else {
            vec![phys]
        };
        out.extend(runs.into_iter().map(|files| Invocation {
            script: script(&action.exec),
            files: if takes_files { files } else { Vec::new() },
            logfile: action.logfile.clone(),
        }));
    }
    out
}

/// Runs one command, blocking until it exits.
fn run(group: &str, inv: &Invocation) {
    let (out, err) = match &inv.logfile {
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
    let files = inv.files.len();
    match inv
        .command()
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
    {
        Ok(st) if st.success() => {
            tracing::info!(%group, command = %inv.script, files, "action ran")
        }
        Ok(st) => {
            tracing::warn!(%group, command = %inv.script, files, status = %st, "action failed")
        }
        Err(e) => {
            tracing::warn!(%group, command = %inv.script, files, error = %e, "action could not start")
        }
    }
}

/// Runs the group's actions for a finished batch (blocking until each command exits).
pub fn run_for(host: &Host, group: &Group, received: &[String], sent: &[String]) {
    for inv in invocations(host, group, received, sent) {
        run(&group.name, &inv);
    }
}

/// [`run_for`] on a blocking thread, so a slow action holds no async worker; callers run it after
/// releasing the group lock, so peers' sessions for the group are not refused as busy meanwhile.
pub async fn run_after_session(host: &Host, group: &Group, received: &[String], sent: &[String]) {
    let invocations = invocations(host, group, received, sent);
    if invocations.is_empty() {
        return;
    }
    let name = group.name.clone();
    let ran = tokio::task::spawn_blocking(move || {
        for inv in &invocations {
            run(&name, inv);
        }
    })
    .await;
    if let Err(e) = ran {
        tracing::error!(group = %group.name, error = %e, "actions panicked");
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

    /// Names a shell would run something for if they were parsed: command substitutions creating
    /// `marker`, quotes of both kinds, a newline, spaces, a leading dash.
    fn hostile_names(marker: &std::path::Path) -> Vec<String> {
        let m = marker.display();
        vec![
            format!("x$(touch {m})"),
            format!("y`touch {m}`"),
            format!("it's \"q\" $(touch {m})"),
            format!("nl\n$(touch {m})"),
            "a  b".into(),
            "-n".into(),
        ]
    }

    /// A one-host config whose group `g` has one action `exec` on `%d%/*`, logging to `DIR/log`.
    fn config(dir: &std::path::Path, exec: &str) -> Result<crate::config::Config, String> {
        let text = format!(
            "[hosts.a]\nprefix={{d=\"{0}/a\"}}\n[groups.g]\nhosts=[\"a\"]\nkey=\"k\"\ninclude=[\"%d%\"]\n[[groups.g.action]]\npattern=\"%d%/*\"\nexec={1}\nlogfile=\"{0}/log\"\n",
            dir.display(),
            toml::Value::String(exec.into())
        );
        crate::config::Config::parse(&text, &dir.join("f.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn file_names_reach_the_command_literally() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("pwned");
        let names = hostile_names(&marker);
        let c = config(d.path(), "printf '<%s>\\n' %%").unwrap();
        let logical: Vec<String> = names.iter().map(|n| format!("%d%/{n}")).collect();
        run_for(&c.hosts["a"], &c.groups["g"], &logical, &[]);
        let log = std::fs::read_to_string(d.path().join("log")).unwrap();
        let mut want: Vec<String> = names
            .iter()
            .map(|n| format!("<{}/a/{n}>\n", d.path().display()))
            .collect();
        want.sort();
        assert_eq!(log, want.concat());
        assert!(!marker.exists(), "a file name was run as a command");
    }

    #[test]
    fn quoted_mark_never_runs_a_name() {
        // Written around a configuration check that refuses these: even so, no quoting of `%%`
        // makes the shell parse a name.
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("pwned");
        let names = hostile_names(&marker);
        let logical: Vec<String> = names.iter().map(|n| format!("%d%/{n}")).collect();
        for exec in [
            "echo \"changed %%\"",
            "echo 'changed %%'",
            "echo \"$(echo %%)\"",
        ] {
            let mut c = config(d.path(), "true").unwrap();
            c.groups.get_mut("g").unwrap().actions[0].exec = exec.into();
            run_for(&c.hosts["a"], &c.groups["g"], &logical, &[]);
            assert!(!marker.exists(), "{exec}: a file name was run as a command");
        }
    }

    #[test]
    fn quoted_mark_is_refused_at_load() {
        for bad in [
            "logger \"changed %%\"",
            "logger 'changed %%'",
            "logger changed\\%%",
            "sh -c \"echo %%\"",
        ] {
            assert_eq!(
                check_exec(bad),
                Err(ExecError::QuotedFiles(bad.into())),
                "{bad}"
            );
            let d = tempfile::tempdir().unwrap();
            let e = config(d.path(), bad).unwrap_err();
            assert!(
                e.contains("groups.g.action[0].exec") && e.contains("%%"),
                "{e}"
            );
        }
        for good in [
            "logger changed %%",
            "nginx -s reload",
            "echo 'it''s' \"a \\\" b\" %% 'x' %%",
            "echo \\' %%",
            "for f in %%; do echo \"$f\"; done",
        ] {
            assert_eq!(check_exec(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn many_files_are_split_to_fit_the_argument_limit() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path(), "echo %%").unwrap();
        let long = "n".repeat(200);
        let logical: Vec<String> = (0..2000).map(|i| format!("%d%/{long}{i:05}")).collect();
        let runs = invocations(&c.hosts["a"], &c.groups["g"], &logical, &[]);
        assert!(runs.len() > 1, "{} runs", runs.len());
        for r in &runs {
            let bytes: usize = r.files.iter().map(|f| f.len() + 1 + 8).sum();
            assert!(bytes <= FILE_ARGS_BUDGET, "{bytes}");
            assert_eq!(r.script, "echo \"$@\"");
        }
        let all: Vec<String> = runs.into_iter().flat_map(|r| r.files).collect();
        let mut want: Vec<String> = logical
            .iter()
            .map(|p| c.hosts["a"].physical(p).unwrap().display().to_string())
            .collect();
        want.sort();
        assert_eq!(all, want);

        assert_eq!(
            split_by_size(vec!["a".repeat(50), "b".into(), "c".into()], 20),
            vec![vec!["a".repeat(50)], vec!["b".to_string(), "c".into()]]
        );
        // Without `%%` the command runs once and gets no files; one run per file when asked.
        let c = config(d.path(), "true").unwrap();
        let runs = invocations(&c.hosts["a"], &c.groups["g"], &logical, &[]);
        assert_eq!(runs.len(), 1);
        assert!(runs[0].files.is_empty());
        let mut c = config(d.path(), "echo %%").unwrap();
        c.groups.get_mut("g").unwrap().actions[0].once_per_batch = false;
        let runs = invocations(&c.hosts["a"], &c.groups["g"], &logical[..3], &[]);
        assert_eq!(runs.len(), 3);
        assert!(runs.iter().all(|r| r.files.len() == 1));
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
