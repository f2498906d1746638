//! State shared by every part of envd: what `/init` configured.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::users::User;

/// What the orchestrator set through `POST /init`.
#[derive(Debug, Clone, Default)]
pub struct InitState {
    /// Sandbox-wide environment variables, added to every process.
    pub env_vars: HashMap<String, String>,
    /// When set, every request except `/health` must carry it.
    pub access_token: Option<String>,
    /// User for requests without Basic auth (default `user`, else `root`).
    pub default_user: Option<String>,
    /// Working directory for processes without a cwd (default: the user's home).
    pub default_workdir: Option<String>,
}

/// Cheap to clone handle to envd's shared state.
#[derive(Debug, Clone, Default)]
pub struct EnvdState {
    init: Arc<RwLock<InitState>>,
}

impl EnvdState {
    pub fn new() -> Self {
        Self::default()
    }

    /// A snapshot of the current `/init` configuration.
    pub fn init(&self) -> InitState {
        self.init.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the `/init` configuration.
    pub fn update_init(&self, f: impl FnOnce(&mut InitState)) {
        f(&mut self.init.write().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn access_token(&self) -> Option<String> {
        self.init
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .access_token
            .clone()
    }

    pub fn env_vars(&self) -> HashMap<String, String> {
        self.init
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .env_vars
            .clone()
    }

    /// The user a request without Basic auth runs as.
    pub fn default_user(&self) -> Result<User, crate::users::UserError> {
        match self.init().default_user {
            Some(name) if !name.is_empty() => User::lookup(&name),
            _ => User::lookup("user").or_else(|_| User::lookup("root")),
        }
    }

    /// The directory relative paths and processes default to for `user`.
    pub fn default_workdir(&self, user: &User) -> std::path::PathBuf {
        match self.init().default_workdir {
            Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
            _ => user.home.clone(),
        }
    }
}
