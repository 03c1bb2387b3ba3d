//! The settings tree: built-in defaults → TOML file → `REMIXD__SECTION__KEY`
//! environment variables → CLI flags, later wins (figment does the layering).
//!
//! Every struct denies unknown fields, so a misspelt key stops the start-up with its
//! name. Secrets are [`Secret`]s: they print as `<redacted>` in `config show` and logs.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use remixd_api::ErrorHttpStatus;
use remixd_domain::CreditPrices;
use serde::{Deserialize, Serialize, Serializer};

/// A secret string: redacted whenever printed.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub data_dir: PathBuf,
    pub database: DatabaseSettings,
    pub storage: StorageSettings,
    pub engine: EngineSettings,
    pub fetch: FetchSettings,
    pub limits: LimitsSettings,
    pub api: ApiSettings,
    pub callbacks: CallbackSettings,
    pub retention: RetentionSettings,
    pub credits: CreditPrices,
    pub worker: WorkerSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::default(),
            data_dir: PathBuf::from("./remixd-data"),
            database: DatabaseSettings::default(),
            storage: StorageSettings::default(),
            engine: EngineSettings::default(),
            fetch: FetchSettings::default(),
            limits: LimitsSettings::default(),
            api: ApiSettings::default(),
            callbacks: CallbackSettings::default(),
            retention: RetentionSettings::default(),
            credits: CreditPrices::default(),
            worker: WorkerSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: String,
    /// Defaults to `http://<listen>` (with the port actually bound).
    pub public_url: Option<String>,
    pub metrics_listen: Option<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            metrics_listen: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Defaults to `sqlite://<data_dir>/remixd.db`.
    pub url: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Defaults to `file://<data_dir>/files`.
    pub url: Option<String>,
    pub s3: S3Settings,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key: Option<Secret>,
    pub secret: Option<Secret>,
    pub path_style: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    pub kind: String,
    pub concurrency: usize,
    pub local: LocalEngineSettings,
    pub fal: ProviderSettings,
    pub ideogram: ProviderSettings,
    pub preview: PreviewSettings,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            kind: "preview".into(),
            concurrency: 1,
            local: LocalEngineSettings::default(),
            fal: ProviderSettings::default(),
            ideogram: ProviderSettings::default(),
            preview: PreviewSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalEngineSettings {
    pub model_dir: Option<PathBuf>,
    pub device: String,
    /// Steps of the full schedule per rendering speed (img2img runs the strength's share).
    pub steps_turbo: usize,
    pub steps_balanced: usize,
    pub steps_quality: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off (SD-Turbo).
    pub guidance_scale: f64,
    /// `ddim`, `euler`, `euler_a`, `dpmpp_2m`; empty takes the model's own scheduler.
    pub scheduler: String,
}

impl Default for LocalEngineSettings {
    fn default() -> Self {
        let d = remixd_diffusion::engine::LocalConfig::new(PathBuf::new());
        Self {
            model_dir: None,
            device: d.device,
            steps_turbo: d.steps[0],
            steps_balanced: d.steps[1],
            steps_quality: d.steps[2],
            guidance_scale: d.guidance_scale,
            scheduler: String::new(),
        }
    }
}

impl LocalEngineSettings {
    /// The engine's configuration; errors name the setting.
    pub fn to_config(&self) -> anyhow::Result<remixd_diffusion::engine::LocalConfig> {
        let Some(model_dir) = self.model_dir.clone() else {
            anyhow::bail!("engine.kind = \"local\" needs engine.local.model_dir (a diffusers-layout model directory)");
        };
        for (key, v) in [
            ("steps_turbo", self.steps_turbo),
            ("steps_balanced", self.steps_balanced),
            ("steps_quality", self.steps_quality),
        ] {
            anyhow::ensure!(
                (1..=200).contains(&v),
                "engine.local.{key} must be 1..=200, not {v}"
            );
        }
        anyhow::ensure!(
            self.guidance_scale.is_finite() && (0.0..=30.0).contains(&self.guidance_scale),
            "engine.local.guidance_scale must be 0..=30"
        );
        let scheduler = remixd_diffusion::engine::scheduler_setting(&self.scheduler)?;
        Ok(remixd_diffusion::engine::LocalConfig {
            model_dir,
            device: self.device.clone(),
            steps: [self.steps_turbo, self.steps_balanced, self.steps_quality],
            guidance_scale: self.guidance_scale,
            scheduler,
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderSettings {
    pub key: Option<Secret>,
    pub base_url: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreviewSettings {
    /// An artificial delay per image, to make the preview engine behave like a slow
    /// one in demos and tests (progress bars, kill-and-restart runs).
    pub delay_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchSettings {
    pub allow: Vec<String>,
    pub timeout_s: u64,
    pub max_image_bytes: u64,
    pub max_pixels: u64,
    /// The sum of width × height over all images of one task, from their headers.
    pub max_task_pixels: u64,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            timeout_s: 30,
            max_image_bytes: 10 * 1024 * 1024,
            max_pixels: 40_000_000,
            max_task_pixels: 120_000_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    pub create_per_10s: u32,
    pub query_per_s: u32,
    pub max_attempts: i64,
    /// Uploads per account per 10 s; 0 turns the limit off.
    pub uploads_per_10s: u32,
    /// Bytes of unexpired uploads one account may keep; 0: no quota.
    pub upload_quota_bytes: u64,
    /// Uploads being received at once for one account; 0: no cap.
    pub uploads_in_flight_per_account: usize,
    /// Uploads being received at once by one API process; 0: no cap.
    pub uploads_in_flight: usize,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            create_per_10s: 20,
            query_per_s: 10,
            max_attempts: 3,
            uploads_per_10s: 20,
            upload_quota_bytes: 1 << 30,
            uploads_in_flight_per_account: 4,
            uploads_in_flight: 8,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    pub error_http_status: ErrorHttpStatus,
    pub maintenance: bool,
    pub disabled: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackSettings {
    /// Limit of one delivery attempt.
    pub timeout_s: f64,
    /// Delays before each retry, in milliseconds; after the last the delivery is given up.
    pub retry_schedule_ms: Vec<u64>,
    /// Delivery attempts in flight at once.
    pub concurrency: usize,
}

impl Default for CallbackSettings {
    fn default() -> Self {
        Self {
            timeout_s: 15.0,
            retry_schedule_ms: remixd_worker::callbacks::DEFAULT_SCHEDULE_S
                .iter()
                .map(|s| s * 1000)
                .collect(),
            concurrency: 32,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// Generated images are deleted after this many days (fractions allowed).
    pub results_days: f64,
    /// Uploads are deleted after this many hours.
    pub uploads_hours: f64,
    /// Task records are deleted after this many days.
    pub tasks_days: f64,
    /// Seconds between retention sweeps.
    pub sweep_interval_s: f64,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            results_days: 14.0,
            uploads_hours: 24.0,
            tasks_days: 60.0,
            sweep_interval_s: 300.0,
        }
    }
}

/// Worker timings (remixd's own keys, beyond the contract's table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// How long a claim lasts without a heartbeat; a dead worker's task waits this long.
    pub lease_ms: u64,
    /// How often idle workers look for work that no wake-up announced.
    pub poll_ms: u64,
    /// Tasks fetching their inputs at once.
    pub fetch_concurrency: usize,
    /// Wait before retrying a task whose engine was temporarily unavailable.
    pub retry_delay_ms: u64,
    /// Time that work in hand gets to finish after SIGTERM.
    pub shutdown_grace_ms: u64,
    /// Image decodes running at once in the process (each holds a full-size canvas).
    pub decode_concurrency: usize,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            lease_ms: 30_000,
            poll_ms: 1_000,
            fetch_concurrency: 4,
            retry_delay_ms: 10_000,
            shutdown_grace_ms: 20_000,
            decode_concurrency: 2,
        }
    }
}

impl Settings {
    /// Loads the layers. `file` is `--config`; without it `remixd.toml` in the working
    /// directory is read when present.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::figment(file)
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    pub fn figment(file: Option<&Path>) -> Figment {
        let mut f = Figment::from(Serialized::defaults(Settings::default()));
        match file {
            Some(p) => f = f.merge(Toml::file_exact(p)),
            None => {
                if Path::new("remixd.toml").exists() {
                    f = f.merge(Toml::file_exact("remixd.toml"));
                }
            }
        }
        f.merge(Env::prefixed("REMIXD__").split("__"))
    }

    pub fn database_url(&self) -> String {
        self.database
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("remixd.db").display()))
    }

    pub fn storage_url(&self) -> String {
        self.storage.url.clone().unwrap_or_else(|| {
            let dir = self.data_dir.join("files");
            let abs = std::path::absolute(&dir).unwrap_or(dir);
            format!("file://{}", abs.display())
        })
    }

    /// Checks what serde cannot: values that parse but make no sense.
    pub fn check(&self) -> anyhow::Result<()> {
        for d in &self.api.disabled {
            anyhow::ensure!(
                remixd_api::ENDPOINTS.contains(&d.as_str()),
                "api.disabled: unknown endpoint {d:?} (known: {})",
                remixd_api::ENDPOINTS.join(", ")
            );
        }
        anyhow::ensure!(
            self.engine.concurrency >= 1,
            "engine.concurrency must be at least 1"
        );
        anyhow::ensure!(
            self.limits.max_attempts >= 1,
            "limits.max_attempts must be at least 1"
        );
        anyhow::ensure!(
            self.worker.lease_ms >= 300,
            "worker.lease_ms must be at least 300"
        );
        anyhow::ensure!(
            self.fetch.timeout_s >= 1,
            "fetch.timeout_s must be at least 1"
        );
        anyhow::ensure!(
            self.fetch.max_pixels >= 1,
            "fetch.max_pixels must be at least 1"
        );
        anyhow::ensure!(
            self.fetch.max_task_pixels >= self.fetch.max_pixels,
            "fetch.max_task_pixels must be at least fetch.max_pixels ({}), or no task could use an image of the largest size",
            self.fetch.max_pixels
        );
        anyhow::ensure!(
            (1..=64).contains(&self.worker.decode_concurrency),
            "worker.decode_concurrency must be 1..=64, not {}",
            self.worker.decode_concurrency
        );
        let quota = self.limits.upload_quota_bytes;
        anyhow::ensure!(
            quota == 0 || quota >= self.fetch.max_image_bytes,
            "limits.upload_quota_bytes must be 0 (no quota) or at least fetch.max_image_bytes ({}), or no upload of the largest size could be kept",
            self.fetch.max_image_bytes
        );
        for (key, v) in [
            (
                "uploads_in_flight_per_account",
                self.limits.uploads_in_flight_per_account,
            ),
            ("uploads_in_flight", self.limits.uploads_in_flight),
        ] {
            anyhow::ensure!(
                v <= 100_000,
                "limits.{key} must be 0 (no cap) up to 100000, not {v}"
            );
        }
        if let Some(u) = &self.server.public_url {
            let parsed =
                url::Url::parse(u).map_err(|e| anyhow::anyhow!("server.public_url {u:?}: {e}"))?;
            anyhow::ensure!(
                matches!(parsed.scheme(), "http" | "https"),
                "server.public_url must be http or https"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = Settings::default();
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        assert_eq!(s.engine.kind, "preview");
        assert_eq!(s.limits.max_attempts, 3);
        assert_eq!(s.fetch.max_image_bytes, 10_485_760);
        assert!(s.database_url().ends_with("remixd-data/remixd.db"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn layers_and_unknown_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "r.toml",
                "[server]\nlisten = \"127.0.0.1:9000\"\n[fetch]\nallow = [\"127.0.0.1/32\"]\n",
            )?;
            jail.set_env("REMIXD__SERVER__LISTEN", "127.0.0.1:9001");
            jail.set_env("REMIXD__API__ERROR_HTTP_STATUS", "always-200");
            let s = Settings::load(Some(Path::new("r.toml"))).unwrap();
            assert_eq!(s.server.listen, "127.0.0.1:9001", "env wins over the file");
            assert_eq!(s.fetch.allow, vec!["127.0.0.1/32"]);
            assert_eq!(s.api.error_http_status, ErrorHttpStatus::Always200);

            jail.create_file("bad.toml", "[server]\nlisten = \"x\"\nlistne = \"y\"\n")?;
            let e = Settings::load(Some(Path::new("bad.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("listne"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn new_limits_are_range_checked_by_name() {
        assert!(Settings::default().check().is_ok());
        let err = |tweak: fn(&mut Settings)| {
            let mut s = Settings::default();
            tweak(&mut s);
            s.check().unwrap_err().to_string()
        };
        assert!(err(|s| s.worker.decode_concurrency = 0).contains("worker.decode_concurrency"));
        assert!(err(|s| s.worker.decode_concurrency = 65).contains("worker.decode_concurrency"));
        assert!(err(|s| s.fetch.max_task_pixels = 1000).contains("fetch.max_task_pixels"));
        assert!(err(|s| s.limits.upload_quota_bytes = 5).contains("limits.upload_quota_bytes"));
        assert!(err(|s| s.limits.uploads_in_flight = 1 << 20).contains("limits.uploads_in_flight"));
        let mut s = Settings::default();
        s.limits.upload_quota_bytes = 0;
        s.limits.uploads_in_flight = 0;
        assert!(s.check().is_ok(), "0 turns them off");
    }

    #[test]
    fn secrets_never_print() {
        let mut s = Settings::default();
        s.engine.fal.key = Some(Secret("fal-very-secret".into()));
        let shown = toml::to_string(&s).unwrap();
        assert!(!shown.contains("very-secret") && shown.contains("<redacted>"));
        assert!(!format!("{s:?}").contains("very-secret"));
    }
}
