//! The command line of OPERATIONS.md: `serve`, `migrate`, `accounts`, `credits`, `keys`,
//! `webhooks`, `config show`, `demo`, and `bench` (remixd's own, for measurements).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use remixd_domain::{now_millis, KeyLimits};

use crate::settings::Settings;
use crate::{open_store, Role};

#[derive(Debug, Parser)]
#[command(
    name = "remixd",
    version,
    about = "Self-hosted character remix: the task API, workers and engines"
)]
pub struct Cli {
    /// A TOML settings file (default: remixd.toml in the working directory, if present).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve {
        #[arg(long, value_enum, default_value_t = Role::All)]
        role: Role,
        /// Listen address (overrides server.listen).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Manage accounts.
    #[command(subcommand)]
    Accounts(AccountsCmd),
    /// Manage credits.
    #[command(subcommand)]
    Credits(CreditsCmd),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Callback signing secrets.
    #[command(subcommand)]
    Webhooks(WebhooksCmd),
    /// Callback deliveries: list them, redeliver one.
    #[command(subcommand)]
    Deliveries(DeliveriesCmd),
    /// Show configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// The configured engine's providers.
    #[command(subcommand)]
    Engines(EnginesCmd),
    /// A client: upload local files, create a task, follow it, download the images.
    Submit(crate::submit::SubmitArgs),
    /// Run one job through the local engine without the server (try or time a model).
    Generate(crate::generate::GenerateArgs),
    /// Start an embedded server on a free port and run a sample task.
    Demo {
        /// Where to write the images.
        #[arg(long, default_value = "remixd-demo")]
        out: PathBuf,
    },
    /// Measurements (prints figures; asserts nothing).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Move data between stores (one machine to many).
    #[command(subcommand)]
    Store(StoreCmd),
}

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Copy every account, key, credit, task, delivery and upload record from one
    /// database into an empty one, and optionally every file from one storage into an
    /// empty one; then verify counts and checksums. Stop remixd on the source first.
    Copy {
        /// The source database: sqlite://PATH or postgres://…
        #[arg(long)]
        from: String,
        /// The target database, empty (migrations are applied to it).
        #[arg(long)]
        to: String,
        /// The source files: file://DIR or s3://bucket/prefix (storage.s3.* reaches buckets).
        #[arg(long, requires = "files_to")]
        files_from: Option<String>,
        /// The target files, holding none.
        #[arg(long, requires = "files_from")]
        files_to: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountsCmd {
    /// Create an account; prints its id.
    Create {
        name: String,
        #[arg(long, default_value_t = 0)]
        credits: i64,
    },
    /// List accounts with their balances.
    List,
}

#[derive(Debug, Subcommand)]
pub enum CreditsCmd {
    /// Add (or, negative, remove) credits; prints the new balance.
    Add {
        #[arg(long)]
        account: String,
        #[arg(allow_negative_numbers = true)]
        amount: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create a key; prints it alone on the last line (shown once).
    Create {
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "")]
        label: String,
        #[arg(long)]
        hourly_limit: Option<i64>,
        #[arg(long)]
        daily_limit: Option<i64>,
        #[arg(long)]
        total_limit: Option<i64>,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        account: Option<String>,
    },
    /// Revoke a key by its id.
    Revoke { key_id: String },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCmd {
    /// Create or rotate the account's callback signing secret; prints it.
    Secret {
        #[arg(long)]
        account: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCmd {
    /// List deliveries, newest first.
    List {
        /// Only deliveries in this state: pending, delivered or failed.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Send a delivery again, now, with a fresh retry schedule.
    Redeliver { delivery_id: String },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// The effective configuration, secrets redacted.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum EnginesCmd {
    /// One cheap authenticated call to each configured provider; says what works.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Time the preview engine per image.
    Preview {
        /// image_size preset.
        #[arg(long, default_value = "square_hd")]
        size: String,
        #[arg(long, default_value_t = 20)]
        iterations: u32,
    },
    /// The local engine's model on the CPU: UNet, VAE, a whole image, matmul peak (JSON).
    Sd {
        /// Model directory in the diffusers layout.
        #[arg(long)]
        model_dir: PathBuf,
        /// Threads for candle (sets RAYON_NUM_THREADS when given).
        #[arg(long)]
        threads: Option<usize>,
        /// Steps of the whole image's full schedule.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// diffusers-style strength of the whole image (share of the schedule run).
        #[arg(long, default_value_t = 0.5)]
        strength: f64,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Measure only these parts (comma-separated); all of them when not given.
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<crate::bench::SdPart>,
    },
    /// One part of the FLUX.2 [klein] model on the CPU (scripts/bench-flux2.sh runs each
    /// part in its own process beside diffusers): one JSON object.
    Flux2 {
        /// Model directory in the diffusers layout.
        #[arg(long)]
        model_dir: PathBuf,
        /// Threads for candle (sets RAYON_NUM_THREADS when given).
        #[arg(long)]
        threads: Option<usize>,
        /// The part to time.
        #[arg(long, value_enum)]
        part: crate::bench::Flux2Part,
        /// Timed runs after one warm-up (the median is reported).
        #[arg(long, default_value_t = 1)]
        repeats: usize,
    },
    /// Resident memory of a `remixd serve` child through hostile bursts: a 13-image
    /// task of 6000×6000 16-bit PNGs, 40 concurrent 10 MB base64 uploads (Linux).
    Memory {
        /// Run the servers with MIMALLOC_PURGE_DELAY=-1 (the local engine's setting).
        #[arg(long)]
        keep_freed: bool,
        /// Another remixd executable to run as the server (e.g. an older build).
        #[arg(long)]
        server_exe: Option<PathBuf>,
    },
    /// The configured database's queue, without HTTP or engines: tasks created and
    /// walked through both claims per second, or shared rate checks per second (JSON
    /// per phase; scripts/bench-scale.sh).
    Queue {
        /// Tasks to create (fill), or rate checks to make (rate).
        #[arg(long, default_value_t = 2000)]
        tasks: usize,
        /// Creators or claimers at once in this process.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, value_enum, default_value_t = crate::bench::QueuePhase::Both)]
        phase: crate::bench::QueuePhase,
    },
    /// Callback latency (completion to receipt) and deliveries per second, on loopback.
    Callbacks {
        /// Tasks in the latency run; the throughput run uses four times as many.
        #[arg(long, default_value_t = 300)]
        tasks: usize,
    },
}

/// Whether this command runs the local diffusion engine in this process: `generate`,
/// `bench sd`, and `serve` (or `demo`) with `engine.kind = "local"` in a process that
/// runs workers. Only such a process wants the allocator to keep freed memory.
pub fn runs_local_engine(cli: &Cli) -> bool {
    let local_engine =
        || Settings::load(cli.config.as_deref()).is_ok_and(|s| s.engine.kind == "local");
    match &cli.command {
        Command::Generate(_) | Command::Bench(BenchCmd::Sd { .. }) => true,
        Command::Serve { role, .. } => *role != Role::Api && local_engine(),
        Command::Demo { .. } => local_engine(),
        _ => false,
    }
}

/// Runs one command; the caller prints errors and sets the exit status.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve { role, listen } => {
            if let Some(l) = listen {
                settings.server.listen = l;
            }
            let listener = tokio::net::TcpListener::bind(&settings.server.listen)
                .await
                .with_context(|| format!("cannot listen on {}", settings.server.listen))?;
            crate::launch_with_listener(settings, listener, role, crate::shutdown_on_signals())
                .await
        }
        Command::Store(StoreCmd::Copy {
            from,
            to,
            files_from,
            files_to,
        }) => {
            use remixd_store::copy::{copy_database, copy_files, Database};
            let redact = crate::settings::redact_url;
            anyhow::ensure!(from != to, "--from and --to name the same database");
            let source = Database::open_source(&from)
                .await
                .with_context(|| format!("opening the source database {}", redact(&from)))?;
            let target = Database::open(&to)
                .await
                .with_context(|| format!("opening the target database {}", redact(&to)))?;
            let tables = copy_database(&source, &target, &redact(&to)).await?;
            for t in &tables {
                println!("{:<18} {:>9} rows  sha256 {}", t.table, t.rows, t.sha256);
            }
            println!(
                "database copied and verified: {} -> {}",
                redact(&from),
                redact(&to)
            );
            if let (Some(ff), Some(ft)) = (files_from, files_to) {
                anyhow::ensure!(
                    ff != ft,
                    "--files-from and --files-to name the same storage"
                );
                let s3 = settings.s3_options();
                let src = remixd_store::Blobs::open_with(&ff, &s3)
                    .with_context(|| format!("opening the source files {ff}"))?;
                let dst = remixd_store::Blobs::open_with(&ft, &s3)
                    .with_context(|| format!("opening the target files {ft}"))?;
                let f = copy_files(&src, &dst, &ft).await?;
                println!(
                    "files copied and verified: {} files, {} bytes, sha256 {} ({ff} -> {ft})",
                    f.files, f.bytes, f.sha256
                );
            }
            Ok(())
        }
        Command::Migrate => {
            open_store(&settings).await?;
            println!(
                "migrations applied to {}",
                crate::settings::redact_url(&settings.database_url())
            );
            Ok(())
        }
        Command::Accounts(AccountsCmd::Create { name, credits }) => {
            anyhow::ensure!(
                !name.trim().is_empty(),
                "the account name must not be empty"
            );
            anyhow::ensure!(credits >= 0, "--credits must not be negative");
            let store = open_store(&settings).await?;
            let acct = store
                .create_account(&crate::uuid_like(), &name, credits, now_millis())
                .await?;
            println!("{}", acct.id);
            Ok(())
        }
        Command::Accounts(AccountsCmd::List) => {
            let store = open_store(&settings).await?;
            println!("{:<32}  {:<24}  {:>10}", "ID", "NAME", "CREDITS");
            for a in store.list_accounts().await? {
                println!("{:<32}  {:<24}  {:>10}", a.id, a.name, a.credits);
            }
            Ok(())
        }
        Command::Credits(CreditsCmd::Add { account, amount }) => {
            let store = open_store(&settings).await?;
            let balance = store.add_credits(&account, amount).await?;
            println!("{balance}");
            Ok(())
        }
        Command::Keys(KeysCmd::Create {
            account,
            label,
            hourly_limit,
            daily_limit,
            total_limit,
        }) => {
            for (name, v) in [
                ("--hourly-limit", hourly_limit),
                ("--daily-limit", daily_limit),
                ("--total-limit", total_limit),
            ] {
                anyhow::ensure!(v.is_none_or(|n| n >= 0), "{name} must not be negative");
            }
            let store = open_store(&settings).await?;
            store
                .account_by_name(&account)
                .await?
                .with_context(|| format!("no account named {account:?}"))?;
            let limits = KeyLimits {
                hourly: hourly_limit,
                daily: daily_limit,
                total: total_limit,
            };
            let (token, record) = remixd_api::auth::generate_key(&account, &label, limits);
            let rec = store.create_key(record, now_millis()).await?;
            println!(
                "key id {} for account {} (shown once; store it now):",
                rec.id, rec.account_name
            );
            println!("{}", token.0);
            Ok(())
        }
        Command::Keys(KeysCmd::List { account }) => {
            let store = open_store(&settings).await?;
            println!(
                "{:<16}  {:<20}  {:<16}  {:>8}  {:>8}  {:>8}  STATUS",
                "KEY ID", "ACCOUNT", "LABEL", "HOURLY", "DAILY", "TOTAL"
            );
            let show = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
            for k in store.list_keys(account.as_deref()).await? {
                println!(
                    "{:<16}  {:<20}  {:<16}  {:>8}  {:>8}  {:>8}  {}",
                    k.id,
                    k.account_name,
                    k.label,
                    show(k.limits.hourly),
                    show(k.limits.daily),
                    show(k.limits.total),
                    if k.revoke_time.is_some() {
                        "revoked"
                    } else {
                        "active"
                    }
                );
            }
            Ok(())
        }
        Command::Keys(KeysCmd::Revoke { key_id }) => {
            let store = open_store(&settings).await?;
            anyhow::ensure!(
                store.revoke_key(&key_id, now_millis()).await?,
                "no active key with id {key_id:?}"
            );
            println!("revoked {key_id}");
            Ok(())
        }
        Command::Webhooks(WebhooksCmd::Secret { account }) => {
            let store = open_store(&settings).await?;
            let secret = remixd_worker::callbacks::new_secret();
            store.set_webhook_secret(&account, &secret).await?;
            println!("{secret}");
            Ok(())
        }
        Command::Deliveries(DeliveriesCmd::List { state, limit }) => {
            let state =
                match state.as_deref() {
                    None => None,
                    Some(s) => Some(remixd_store::DeliveryState::parse(s).with_context(|| {
                        format!("--state {s:?}: use pending, delivered or failed")
                    })?),
                };
            let store = open_store(&settings).await?;
            println!(
                "{:<36}  {:<32}  {:<9}  {:>8}  {:>6}  {:<40}  LAST ERROR",
                "DELIVERY ID", "TASK", "STATE", "ATTEMPTS", "STATUS", "URL"
            );
            for d in store.list_deliveries(state, limit).await? {
                println!(
                    "{:<36}  {:<32}  {:<9}  {:>8}  {:>6}  {:<40}  {}",
                    d.id,
                    d.task_id,
                    d.state.as_str(),
                    d.attempts,
                    d.last_status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    d.url,
                    d.last_error
                );
            }
            Ok(())
        }
        Command::Deliveries(DeliveriesCmd::Redeliver { delivery_id }) => {
            let store = open_store(&settings).await?;
            anyhow::ensure!(
                store.redeliver(&delivery_id, now_millis()).await?,
                "no delivery with id {delivery_id:?}"
            );
            println!("{delivery_id} queued for delivery now");
            Ok(())
        }
        Command::Config(ConfigCmd::Show) => {
            settings.check()?;
            print!("{}", toml::to_string(&settings)?);
            println!(
                "# effective: database.url = {:?}, storage.url = {:?}",
                crate::settings::redact_url(&settings.database_url()),
                settings.storage_url()
            );
            for (name, p) in [
                ("fal", &settings.engine.fal),
                ("ideogram", &settings.engine.ideogram),
            ] {
                let kind = remixd_upstream::Kind::parse(name).expect("a provider");
                let source = if p.key.is_some() {
                    "the configuration"
                } else if std::env::var_os(remixd_upstream::key_env(kind)).is_some() {
                    remixd_upstream::key_env(kind)
                } else {
                    continue;
                };
                println!("# effective: engine.{name}.key = <redacted> (from {source})");
            }
            Ok(())
        }
        Command::Engines(EnginesCmd::Check) => {
            settings.check()?;
            let fetcher = crate::build_fetcher(&settings, None)?;
            let Some(gw) = crate::build_gateway(&settings, &fetcher)? else {
                println!(
                    "engine.kind = {:?} runs in this process: no provider to check",
                    settings.engine.kind
                );
                return Ok(());
            };
            let mut failed = Vec::new();
            for (kind, r) in gw.check().await {
                match r {
                    Ok(m) => println!("{}: ok: {m}", kind.name()),
                    Err(m) => {
                        println!("{}: FAILED: {m}", kind.name());
                        failed.push(kind.name());
                    }
                }
            }
            anyhow::ensure!(failed.is_empty(), "not working: {}", failed.join(", "));
            Ok(())
        }
        Command::Demo { out } => crate::demo::run(settings, &out).await,
        Command::Generate(args) => {
            tokio::task::spawn_blocking(move || crate::generate::run(&settings, args)).await?
        }
        Command::Submit(args) => {
            let base = settings
                .server
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", settings.server.listen));
            crate::submit::run(args, base, settings.data_dir.join("default.key")).await
        }
        Command::Bench(BenchCmd::Preview { size, iterations }) => {
            crate::bench::preview(&size, iterations)
        }
        Command::Bench(BenchCmd::Sd {
            model_dir,
            threads,
            steps,
            strength,
            repeats,
            only,
        }) => {
            if let Some(n) = threads {
                // Read by candle's thread pools when they first start, which is later.
                std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            }
            let b = crate::bench::SdBench {
                model_dir,
                steps,
                strength,
                repeats,
                only,
            };
            tokio::task::spawn_blocking(move || crate::bench::sd(b)).await?
        }
        Command::Bench(BenchCmd::Flux2 {
            model_dir,
            threads,
            part,
            repeats,
        }) => {
            if let Some(n) = threads {
                // Read by candle's thread pools when they first start, which is later.
                std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            }
            tokio::task::spawn_blocking(move || crate::bench::flux2(&model_dir, part, repeats))
                .await?
        }
        Command::Bench(BenchCmd::Memory {
            keep_freed,
            server_exe,
        }) => crate::membench::memory(keep_freed, server_exe).await,
        Command::Bench(BenchCmd::Queue {
            tasks,
            concurrency,
            phase,
        }) => crate::bench::queue(settings, tasks, concurrency, phase).await,
        Command::Bench(BenchCmd::Callbacks { tasks }) => {
            crate::bench::callbacks(settings, tasks).await
        }
    }
}
