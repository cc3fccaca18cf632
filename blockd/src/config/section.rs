//! A TOML table being consumed key by key, knowing its key path, so every error names the
//! file, the full key (`resource.r0.node.beta.address`) and the problem, and keys nobody
//! consumed are reported as unknown.

use std::path::{Path, PathBuf};

use super::ConfigError;

/// A table and where it is.
pub(crate) struct Section<'a> {
    file: &'a Path,
    path: String,
    table: toml::Table,
}

impl<'a> Section<'a> {
    pub(crate) fn root(file: &'a Path, table: toml::Table) -> Section<'a> {
        Section {
            file,
            path: String::new(),
            table,
        }
    }

    /// The key path of `key` in this section.
    pub(crate) fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// An error about `key` of this section.
    pub(crate) fn error(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: self.key(key),
            problem: problem.into(),
        }
    }

    /// An error about the section itself.
    pub(crate) fn error_here(&self, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: self.path.clone(),
            problem: problem.into(),
        }
    }

    fn type_error(&self, key: &str, expected: &str, found: &toml::Value) -> ConfigError {
        self.error(
            key,
            format!("expected {expected}, found {}", found.type_str()),
        )
    }

    pub(crate) fn string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.type_error(key, "a string", &other)),
        }
    }

    pub(crate) fn required_string(&mut self, key: &str) -> Result<String, ConfigError> {
        self.string(key)?
            .ok_or_else(|| self.error(key, "missing (required)"))
    }

    pub(crate) fn integer(&mut self, key: &str) -> Result<Option<i64>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) => Ok(Some(i)),
            Some(other) => Err(self.type_error(key, "an integer", &other)),
        }
    }

    /// A string or an integer, as text (for sizes like `"4K"` or `4096`, and `quorum`).
    pub(crate) fn string_or_integer(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(toml::Value::Integer(i)) => Ok(Some(i.to_string())),
            Some(other) => Err(self.type_error(key, "a string or an integer", &other)),
        }
    }

    /// A file path; relative paths are relative to the config file's directory.
    pub(crate) fn path(&mut self, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        if s.is_empty() {
            return Err(self.error(key, "empty path"));
        }
        Ok(Some(self.resolve(&s)))
    }

    pub(crate) fn resolve(&self, s: &str) -> PathBuf {
        let p = PathBuf::from(s);
        if p.is_absolute() {
            p
        } else {
            self.file.parent().unwrap_or_else(|| Path::new(".")).join(p)
        }
    }

    /// A sub-table.
    pub(crate) fn table(&mut self, key: &str) -> Result<Option<Section<'a>>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(Section {
                file: self.file,
                path: self.key(key),
                table: t,
            })),
            Some(other) => Err(self.type_error(key, "a table", &other)),
        }
    }

    /// The entries of a sub-table whose values are all tables (`[resource.NAME]`), in file
    /// order... TOML tables are sorted by key here, which keeps output deterministic.
    pub(crate) fn tables(&mut self, key: &str) -> Result<Vec<(String, Section<'a>)>, ConfigError> {
        let Some(mut outer) = self.table(key)? else {
            return Ok(Vec::new());
        };
        let names: Vec<String> = outer.table.keys().cloned().collect();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let sec = outer.table(&name)?.expect("key listed above");
            out.push((name, sec));
        }
        Ok(out)
    }

    /// An array of tables (`[[resource.r0.connection]]`), each with its index in the path.
    pub(crate) fn array_of_tables(&mut self, key: &str) -> Result<Vec<Section<'a>>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        toml::Value::Table(t) => out.push(Section {
                            file: self.file,
                            path: format!("{}[{i}]", self.key(key)),
                            table: t,
                        }),
                        other => {
                            return Err(self.type_error(&format!("{key}[{i}]"), "a table", &other));
                        }
                    }
                }
                Ok(out)
            }
            Some(other) => Err(self.type_error(key, "an array of tables", &other)),
        }
    }

    /// An array of strings.
    pub(crate) fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    other => Err(self.type_error(key, "an array of strings", &other)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(other) => Err(self.type_error(key, "an array of strings", &other)),
        }
    }

    /// Fails on the first key nobody consumed.
    pub(crate) fn finish(self) -> Result<(), ConfigError> {
        match self.table.keys().next() {
            Some(k) => Err(self.error(k, "unknown key")),
            None => Ok(()),
        }
    }
}
