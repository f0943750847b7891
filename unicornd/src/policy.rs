//! The policy file (`/etc/unicorn/unicornd.toml`): who may connect, and each session's limits.
//!
//! Every key is optional; `unicornd.toml` in the source tree lists them all with their defaults.
//! Unknown keys are errors, so a typo never silently loosens a limit.

use std::path::Path;

use serde::Deserialize;
use thiserror::Error;
use unicorn::protocol::{Limits, Priority};

/// Where the system daemon reads its policy.
pub const DEFAULT_POLICY_PATH: &str = "/etc/unicorn/unicornd.toml";

#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("policy file {path}: {message}")]
    Parse { path: String, message: String },
}

/// A user or group, by name or number.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Principal {
    Id(u32),
    Name(String),
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Access {
    /// Users admitted besides root. When both `users` and `groups` are empty, everyone who can
    /// open the socket is admitted (its owner, group and mode decide).
    pub users: Vec<Principal>,
    /// Groups whose members (primary or supplementary) are admitted.
    pub groups: Vec<Principal>,
    /// Whether root is admitted; true unless set to false.
    pub allow_root: Option<bool>,
}

/// Per-session limits; each may be overridden for one user in a `[[user]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionLimits {
    pub max_jobs_in_flight: u32,
    pub max_buffers: u32,
    pub max_buffer_bytes: u64,
    /// Submission ring entries when the client does not ask for a size.
    pub sq_entries: u32,
    pub max_sq_entries: u32,
    /// Longest the daemon polls a session's ring after activity, in microseconds.
    pub max_spin_us: u32,
    /// The highest scheduling class a session may have; higher requests are lowered to it.
    pub max_priority: String,
    /// Sessions one user may hold at once.
    pub max_sessions_per_user: u32,
    /// Malformed ring entries in a row before the session is disconnected.
    pub max_malformed_entries: u32,
    /// Models a session may hold (loading one already loaded by another session shares it).
    pub max_models: u32,
    /// Contexts a session may hold.
    pub max_contexts: u32,
    /// KV-cache positions of all a session's contexts together.
    pub max_kv_tokens: u32,
    /// Largest model file a session may load, in bytes.
    pub max_model_bytes: u64,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_jobs_in_flight: 256,
            max_buffers: 64,
            max_buffer_bytes: 1 << 30,
            sq_entries: 256,
            max_sq_entries: 4096,
            max_spin_us: 1000,
            max_priority: "interactive".into(),
            max_sessions_per_user: 64,
            max_malformed_entries: 1024,
            max_models: 4,
            max_contexts: 16,
            max_kv_tokens: 65536,
            max_model_bytes: 16 << 30,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonSettings {
    /// Sessions at once, all users together.
    pub max_sessions: u32,
    /// Seconds a new connection has to say hello.
    pub handshake_timeout_s: u32,
    /// Seconds a model stays loaded after its last user is gone (0: unloaded at once).
    pub model_keep_alive_s: u32,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        DaemonSettings { max_sessions: 512, handshake_timeout_s: 5, model_keep_alive_s: 0 }
    }
}

/// Limits for one user, overriding `[limits]` field by field.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserOverride {
    pub user: Principal,
    pub max_jobs_in_flight: Option<u32>,
    pub max_buffers: Option<u32>,
    pub max_buffer_bytes: Option<u64>,
    pub max_sq_entries: Option<u32>,
    pub max_spin_us: Option<u32>,
    pub max_priority: Option<String>,
    pub max_sessions_per_user: Option<u32>,
    pub max_models: Option<u32>,
    pub max_contexts: Option<u32>,
    pub max_kv_tokens: Option<u32>,
    pub max_model_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyFile {
    pub daemon: DaemonSettings,
    pub access: Access,
    pub limits: SessionLimits,
    #[serde(rename = "user")]
    pub users: Vec<UserOverride>,
}

/// The limits that apply to one session, resolved for its user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub limits: Limits,
    pub sq_entries: u32,
    pub max_sq_entries: u32,
    pub max_spin_us: u32,
    pub max_priority: Priority,
    pub max_sessions_per_user: u32,
    pub max_malformed_entries: u32,
    pub max_model_bytes: u64,
}

/// A checked policy with names resolved to ids.
#[derive(Clone, Debug)]
pub struct Policy {
    pub daemon: DaemonSettings,
    uids: Vec<u32>,
    gids: Vec<u32>,
    allow_root: bool,
    base: Resolved,
    overrides: Vec<(u32, Resolved)>,
}

fn priority(name: &str, what: &str) -> Result<Priority, String> {
    Priority::from_name(name).ok_or_else(|| {
        format!("{what} = {name:?}: expected realtime, interactive, normal or background")
    })
}

fn uid_of(p: &Principal) -> Result<u32, String> {
    match p {
        Principal::Id(id) => Ok(*id),
        Principal::Name(name) => match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(u.uid.as_raw()),
            _ => Err(format!("unknown user {name:?}")),
        },
    }
}

fn gid_of(p: &Principal) -> Result<u32, String> {
    match p {
        Principal::Id(id) => Ok(*id),
        Principal::Name(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Ok(g.gid.as_raw()),
            _ => Err(format!("unknown group {name:?}")),
        },
    }
}

impl Policy {
    /// Reads `path`. With `required` false a missing file means the defaults.
    pub fn load(path: &Path, required: bool) -> Result<Policy, PolicyError> {
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                log::info!("no policy file at {shown}; using the defaults");
                return Ok(Policy::default());
            }
            Err(source) => return Err(PolicyError::Read { path: shown, source }),
        };
        Policy::parse(&text).map_err(|message| PolicyError::Parse { path: shown, message })
    }

    /// Parses and checks a policy.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Policy::from_file(file)
    }

    fn from_file(file: PolicyFile) -> Result<Policy, String> {
        let l = &file.limits;
        let base = Resolved {
            limits: Limits {
                max_jobs_in_flight: l.max_jobs_in_flight,
                max_buffers: l.max_buffers,
                max_buffer_bytes: l.max_buffer_bytes,
                max_models: l.max_models,
                max_contexts: l.max_contexts,
                max_kv_tokens: l.max_kv_tokens,
            },
            sq_entries: l.sq_entries,
            max_sq_entries: l.max_sq_entries,
            max_spin_us: l.max_spin_us,
            max_priority: priority(&l.max_priority, "limits.max_priority")?,
            max_sessions_per_user: l.max_sessions_per_user,
            max_malformed_entries: l.max_malformed_entries,
            max_model_bytes: l.max_model_bytes,
        };
        check(&base)?;
        let mut overrides = Vec::new();
        for o in &file.users {
            let uid = uid_of(&o.user)?;
            let mut r = base.clone();
            if let Some(v) = o.max_jobs_in_flight {
                r.limits.max_jobs_in_flight = v;
            }
            if let Some(v) = o.max_buffers {
                r.limits.max_buffers = v;
            }
            if let Some(v) = o.max_buffer_bytes {
                r.limits.max_buffer_bytes = v;
            }
            if let Some(v) = o.max_sq_entries {
                r.max_sq_entries = v;
            }
            if let Some(v) = o.max_spin_us {
                r.max_spin_us = v;
            }
            if let Some(v) = &o.max_priority {
                r.max_priority = priority(v, "user.max_priority")?;
            }
            if let Some(v) = o.max_sessions_per_user {
                r.max_sessions_per_user = v;
            }
            if let Some(v) = o.max_models {
                r.limits.max_models = v;
            }
            if let Some(v) = o.max_contexts {
                r.limits.max_contexts = v;
            }
            if let Some(v) = o.max_kv_tokens {
                r.limits.max_kv_tokens = v;
            }
            if let Some(v) = o.max_model_bytes {
                r.max_model_bytes = v;
            }
            check(&r)?;
            overrides.push((uid, r));
        }
        if file.daemon.max_sessions == 0 {
            return Err("daemon.max_sessions must be at least 1".into());
        }
        Ok(Policy {
            uids: file.access.users.iter().map(uid_of).collect::<Result<_, _>>()?,
            gids: file.access.groups.iter().map(gid_of).collect::<Result<_, _>>()?,
            allow_root: file.access.allow_root.unwrap_or(true),
            daemon: file.daemon,
            base,
            overrides,
        })
    }

    /// The policy of a user-mode daemon: only `uid` may connect.
    pub fn only_user(mut self, uid: u32) -> Policy {
        self.uids = vec![uid];
        self.gids.clear();
        self.allow_root = uid == 0;
        self
    }

    /// Whether a peer may open a session, and why not.
    pub fn admits(&self, creds: &unicorn::sys::peer::PeerCredentials) -> Result<(), String> {
        if creds.uid == 0 {
            return if self.allow_root { Ok(()) } else { Err("root is not admitted".into()) };
        }
        if self.uids.is_empty() && self.gids.is_empty() {
            return Ok(());
        }
        if self.uids.contains(&creds.uid) || self.gids.iter().any(|g| creds.in_group(*g)) {
            return Ok(());
        }
        Err(format!("uid {} is not among the users or groups the policy admits", creds.uid))
    }

    /// The limits of a session of `uid`.
    pub fn for_user(&self, uid: u32) -> &Resolved {
        self.overrides.iter().find(|(u, _)| *u == uid).map(|(_, r)| r).unwrap_or(&self.base)
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::from_file(PolicyFile::default()).expect("the default policy is valid")
    }
}

fn check(r: &Resolved) -> Result<(), String> {
    let sq_ok =
        |v: u32| v.is_power_of_two() && (2..=unicorn::protocol::ring::MAX_SQ_ENTRIES).contains(&v);
    if !sq_ok(r.sq_entries) || !sq_ok(r.max_sq_entries) || r.sq_entries > r.max_sq_entries {
        return Err(format!(
            "sq_entries {} / max_sq_entries {}: powers of two in 2..=4096, default <= max",
            r.sq_entries, r.max_sq_entries
        ));
    }
    if r.limits.max_jobs_in_flight == 0 || r.limits.max_jobs_in_flight > 65536 {
        return Err("max_jobs_in_flight must be in 1..=65536".into());
    }
    if r.max_malformed_entries == 0 {
        return Err("max_malformed_entries must be at least 1".into());
    }
    if r.max_spin_us > 1_000_000 {
        return Err("max_spin_us must be at most 1000000 (one second)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use unicorn::sys::peer::PeerCredentials;

    fn creds(uid: u32, gid: u32, groups: &[u32]) -> PeerCredentials {
        PeerCredentials { pid: 1, uid, gid, groups: groups.to_vec() }
    }

    #[test]
    fn shipped_example_parses_to_the_defaults() {
        let text = include_str!("../unicornd.toml");
        let p = Policy::parse(text).unwrap();
        let d = Policy::default();
        assert_eq!(p.base, d.base);
        assert_eq!(p.daemon, d.daemon);
    }

    #[test]
    fn admission_by_user_and_group() {
        let open = Policy::default();
        assert!(open.admits(&creds(1000, 1000, &[])).is_ok());
        let p = Policy::parse("[access]\nusers = [1001]\ngroups = [500]\nallow_root = false\n")
            .unwrap();
        assert!(p.admits(&creds(1001, 1, &[])).is_ok());
        assert!(p.admits(&creds(1002, 500, &[])).is_ok());
        assert!(p.admits(&creds(1003, 1, &[7, 500])).is_ok());
        assert!(p.admits(&creds(1004, 1, &[7])).is_err());
        assert!(p.admits(&creds(0, 0, &[])).is_err());
        let user = Policy::default().only_user(1234);
        assert!(user.admits(&creds(1234, 1, &[])).is_ok());
        assert!(user.admits(&creds(1235, 1, &[])).is_err());
        assert!(user.admits(&creds(0, 0, &[])).is_err());
    }

    #[test]
    fn per_user_overrides() {
        let p = Policy::parse(
            "[limits]\nmax_buffers = 8\n[[user]]\nuser = 42\nmax_buffers = 2\nmax_priority = \"realtime\"\n",
        )
        .unwrap();
        assert_eq!(p.for_user(1).limits.max_buffers, 8);
        assert_eq!(p.for_user(42).limits.max_buffers, 2);
        assert_eq!(p.for_user(42).max_priority, Priority::Realtime);
        assert_eq!(p.for_user(1).max_priority, Priority::Interactive);
    }

    #[test]
    fn mistakes_are_reported() {
        for bad in [
            "[limits]\nmax_bufers = 1\n",
            "[limits]\nsq_entries = 100\n",
            "[limits]\nmax_priority = \"urgent\"\n",
            "[limits]\nmax_jobs_in_flight = 0\n",
            "[access]\nusers = [\"no-such-user-here\"]\n",
            "[daemon]\nmax_sessions = 0\n",
            "not toml",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }
}
