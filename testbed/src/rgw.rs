//! A real S3 server that enforces Object Lock, for the immutability tests:
//! Ceph's radosgw on a single-node cluster, started by
//! `scripts/s3-lock-server.sh` (about 1.5 s).
//!
//! * [`LockServer::shared`] is one server per test process (tests that use
//!   it run in parallel, each in its own buckets, with its own users); it
//!   stops by itself once the test process is gone.
//! * [`LockServer::start`] is a server of one's own, stopped on drop.
//! * [`LockServer::create_bucket`] makes a bucket with Object Lock enabled,
//!   [`LockServer::create_user`] an S3 user (with no rights on anyone's
//!   bucket until a policy grants them), [`LockServer::set_policy`] a
//!   bucket's policy.
//!
//! The owner, who owns every bucket made here, may do anything a bucket
//! owner may: what locks forbid, they forbid the owner too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::util::{io_err, run, unique_name};
use crate::{Error, Result};

/// An S3 access key and its secret.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The user's name (`arn:aws:iam:::user/NAME` in a policy).
    pub user: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
}

/// A running radosgw on loopback.
#[derive(Debug)]
pub struct LockServer {
    dir: tempfile::TempDir,
    endpoint: String,
    /// The bucket owner's keys.
    pub owner: Credentials,
    /// Stop on drop (not for the shared one: statics are never dropped).
    owned: bool,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testbed sits in the workspace")
        .join("scripts/s3-lock-server.sh")
}

/// `export K=V` lines as pairs.
fn exports(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn var(vars: &[(String, String)], k: &str) -> Result<String> {
    vars.iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| Error::Unexpected(format!("s3-lock-server.sh printed no {k}")))
}

impl LockServer {
    /// One server for the whole test process, started at the first call.
    pub fn shared() -> Result<&'static LockServer> {
        static SHARED: OnceLock<std::result::Result<LockServer, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Self::launch(false).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Setup(format!("the Object Lock S3 server did not start: {e}")))
    }

    /// A server of one's own, stopped (and its directory removed) on drop.
    pub fn start() -> Result<LockServer> {
        Self::launch(true)
    }

    fn launch(owned: bool) -> Result<LockServer> {
        if Command::new("radosgw").arg("--version").output().is_err() {
            return Err(Error::Setup(
                "radosgw is not installed (Debian: radosgw ceph-mon ceph-osd ceph-common)".into(),
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("bw-rgw-")
            .tempdir()
            .map_err(io_err("creating the radosgw directory"))?;
        let out = run(Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir.path())
            .args(["--owner-pid", &std::process::id().to_string()]))?;
        let vars = exports(&out);
        Ok(LockServer {
            endpoint: var(&vars, "AWS_ENDPOINT_URL")?,
            owner: Credentials {
                user: "owner".into(),
                access_key: var(&vars, "AWS_ACCESS_KEY_ID")?,
                secret_key: var(&vars, "AWS_SECRET_ACCESS_KEY")?,
            },
            dir,
            owned,
        })
    }

    fn script(&self, args: &[&str]) -> Result<String> {
        run(Command::new("bash")
            .arg(script())
            .arg(args[0])
            .arg(self.dir.path())
            .args(&args[1..]))
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A new bucket with Object Lock (and so versioning) enabled.
    pub fn create_bucket(&self) -> Result<String> {
        Ok(self.script(&["bucket"])?.trim().to_string())
    }

    /// A new bucket without Object Lock.
    pub fn create_plain_bucket(&self) -> Result<String> {
        Ok(self.script(&["bucket", "--no-lock"])?.trim().to_string())
    }

    /// A new user named `PREFIX-<unique>`.
    pub fn create_user(&self, prefix: &str) -> Result<Credentials> {
        let user = unique_name(prefix);
        let vars = exports(&self.script(&["user", &user])?);
        Ok(Credentials {
            access_key: var(&vars, "AWS_ACCESS_KEY_ID")?,
            secret_key: var(&vars, "AWS_SECRET_ACCESS_KEY")?,
            user,
        })
    }

    /// Sets `bucket`'s policy (JSON), as the owner.
    pub fn set_policy(&self, bucket: &str, policy: &str) -> Result<()> {
        let file = self
            .dir
            .path()
            .join(format!("{}.json", unique_name("policy")));
        std::fs::write(&file, policy).map_err(io_err("writing the bucket policy"))?;
        let r = self.script(&["policy", bucket, &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        r.map(drop)
    }

    /// Environment for an S3 client of this server with `creds`.
    pub fn env(&self, creds: &Credentials) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), creds.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), creds.secret_key.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            // Keep a developer's own AWS profile out of the tests.
            ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    /// A plain S3 request signed by curl with `creds`: what an attacker
    /// with those keys can do, no client rules in the way.
    fn curl(&self, creds: &Credentials, method: &str, url: &str) -> Command {
        let mut c = Command::new("curl");
        c.args(["-fsS", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{}:{}", creds.access_key, creds.secret_key))
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-X", method])
            .arg(format!("{}/{url}", self.endpoint));
        c
    }

    /// PUTs `data` as `key` with `creds`.
    pub fn put_raw(&self, creds: &Credentials, bucket: &str, key: &str, data: &[u8]) -> Result<()> {
        let file = self.dir.path().join(unique_name("body"));
        std::fs::write(&file, data).map_err(io_err("writing the request body"))?;
        let r = run(self
            .curl(creds, "PUT", &format!("{bucket}/{key}"))
            .arg("--data-binary")
            .arg(format!("@{}", file.display())));
        let _ = std::fs::remove_file(&file);
        r.map(drop)
    }

    /// DELETEs `version` of `key` with `creds`, asking to bypass a
    /// governance lock.
    pub fn delete_bypassing(
        &self,
        creds: &Credentials,
        bucket: &str,
        key: &str,
        version: &str,
    ) -> Result<()> {
        run(self
            .curl(
                creds,
                "DELETE",
                &format!("{bucket}/{key}?versionId={version}"),
            )
            .args(["-H", "x-amz-bypass-governance-retention: true"]))
        .map(drop)
    }

    /// The server's logs (radosgw's request log is `client.rgw.log`).
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }
}

impl Drop for LockServer {
    fn drop(&mut self) {
        if self.owned {
            let _ = self.script(&["stop"]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_parse() {
        let v = exports("export A=1\nnoise\nexport B=x=y\n");
        assert_eq!(var(&v, "A").unwrap(), "1");
        assert_eq!(var(&v, "B").unwrap(), "x=y");
        assert!(var(&v, "C").is_err());
    }
}
