//! `bulwark web`: serve the dashboard; `bulwark web user add` and `bulwark
//! web token add` fill its users file.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::{self, Config};
use crate::web::auth::{Role, Users};
use crate::web::{cache, peers, server, Web};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    cmd: Option<WebCmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The agent's config, with a [web] section (listen, users_file).
    #[arg(long, env = "BULWARK_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Listen here instead of [web] listen (ADDR:PORT; port 0 picks one).
    #[arg(long)]
    listen: Option<String>,
    /// Serve plain HTTP beyond loopback (only on a trusted network).
    #[arg(long)]
    insecure: bool,
}

#[derive(clap::Subcommand)]
enum WebCmd {
    /// Users who log in with a password.
    #[command(subcommand)]
    User(UserCmd),
    /// Tokens another host's dashboard reads this one with.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Runs the restores of one dashboard task (started by `bulwark web`).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(clap::Subcommand)]
enum UserCmd {
    /// Adds (or replaces) a user; the password is read on standard input.
    Add {
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        #[arg(long)]
        users_file: PathBuf,
    },
    /// Removes a user.
    Remove {
        name: String,
        #[arg(long)]
        users_file: PathBuf,
    },
}

#[derive(clap::Subcommand)]
enum TokenCmd {
    /// Adds (or replaces) a token and prints it (stored hashed: shown once).
    Add {
        name: String,
        #[arg(long, value_enum, default_value = "viewer")]
        role: Role,
        #[arg(long)]
        users_file: PathBuf,
    },
}

pub fn run(a: Args) -> Result<i32> {
    match a.cmd {
        None => serve(a.serve),
        Some(WebCmd::Worker { config }) => crate::web::worker::run_child(&config),
        Some(WebCmd::User(UserCmd::Add {
            name,
            role,
            users_file,
        })) => {
            let password = read_password()?;
            let mut users = Users::load(&users_file)?;
            users.add_user(&name, role, &password)?;
            users.save(&users_file)?;
            println!("{name}: {} in {}", role.as_str(), users_file.display());
            Ok(0)
        }
        Some(WebCmd::User(UserCmd::Remove { name, users_file })) => {
            let mut users = Users::load(&users_file)?;
            if users.users.remove(&name).is_none() {
                bail!("no user {name} in {}", users_file.display());
            }
            users.save(&users_file)?;
            println!("{name}: removed (sessions end when `bulwark web` restarts or they expire)");
            Ok(0)
        }
        Some(WebCmd::Token(TokenCmd::Add {
            name,
            role,
            users_file,
        })) => {
            let mut users = Users::load(&users_file)?;
            let token = users.add_token(&name, role)?;
            users.save(&users_file)?;
            println!("{token}");
            Ok(0)
        }
    }
}

/// The password: typed twice on a terminal, else standard input's first
/// line.
fn read_password() -> Result<String> {
    if std::io::stdin().is_terminal() {
        let pw = rpassword::prompt_password("password: ")?;
        if rpassword::prompt_password("again: ")? != pw {
            bail!("passwords do not match");
        }
        return Ok(pw);
    }
    let mut s = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut s)
        .context("reading the password on standard input")?;
    let pw = s.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        bail!("no password on standard input");
    }
    Ok(pw)
}

fn serve(a: ServeArgs) -> Result<i32> {
    let cfg = Config::load(&a.config)?;
    let conf = cfg.web.clone().with_context(|| {
        format!(
            "{} has no [web] section: add one with listen and users_file",
            a.config.display()
        )
    })?;
    let listen = a.listen.clone().unwrap_or_else(|| conf.listen.clone());
    let tls = match (&conf.tls_cert, &conf.tls_key) {
        (Some(c), Some(k)) => Some(server::tls_acceptor(c, k).context("[web] tls_cert/tls_key")?),
        (None, None) => None,
        _ => bail!("[web]: set both tls_cert and tls_key, or neither"),
    };
    server::check_exposure(&listen, tls.is_some(), a.insecure)?;
    if Users::load(&conf.users_file)?.users.is_empty() {
        eprintln!(
            "note: no users in {}: add one with `bulwark web user add NAME --role admin --users-file {}`",
            conf.users_file.display(),
            conf.users_file.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let config_path = std::path::absolute(&a.config)?;
    rt.block_on(async move {
        let web = Web::new(cfg, conf, config_path, tls.is_some())?;
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        // Scripts and tests read this line (with port 0, the port is new).
        println!("listening on {scheme}://{}", listener.local_addr()?);
        cache::keep_fresh(web.clone(), Duration::from_secs(15));
        peers::keep_polling(web.clone());
        server::serve(listener, server::router(web), tls).await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(0)
}
