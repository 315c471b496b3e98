//! The Kafka / Amazon MSK backend's wiring: `[kafka]` into the pipeline's client config, the MSK
//! IAM signer, and the group member over DynamoDB. Without the `kafka` feature every entry point
//! answers with how to build it.

use crate::runtime::config::KafkaSection;

/// `--kafka`, `--brokers`, `--topic`: the flags of the commands that can use Kafka.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KafkaArgs {
    /// Use the `[kafka]` topic instead of Kinesis or the embedded log (`ingest serve` puts onto
    /// it, `consume` reads it as a member of its Kafka group, state and leases in DynamoDB);
    /// needs a build with the `kafka` feature. Also implied by `kafka.brokers` being set.
    #[arg(long)]
    pub kafka: bool,
    /// Kafka brokers (implies --kafka; overrides `kafka.brokers`).
    #[arg(long, value_name = "HOST:PORT,…")]
    pub brokers: Option<String>,
    /// Kafka topic (implies --kafka; overrides `kafka.topic`).
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
}

impl KafkaArgs {
    /// The target these flags and `[kafka]` ask for, if any.
    pub fn target(self, section: &KafkaSection) -> anyhow::Result<Option<KafkaTarget>> {
        KafkaTarget::resolve(section, self.kafka, self.brokers, self.topic)
    }
}

/// Where the topic is: `[kafka]` with the command line's overrides applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaTarget {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The topic.
    pub topic: String,
}

impl KafkaTarget {
    /// The target of `--kafka` with optional `--brokers` / `--topic` overrides, or of
    /// `kafka.brokers` being set (as `kinesis.stream` set means Kinesis; Kafka wins when both
    /// are); `None` when Kafka is not asked for. Asked for without brokers is an error that says
    /// where to set them.
    pub fn resolve(
        section: &KafkaSection,
        asked: bool,
        brokers: Option<String>,
        topic: Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        if !asked && brokers.is_none() && topic.is_none() && section.brokers.is_none() {
            return Ok(None);
        }
        let brokers = brokers.or_else(|| section.brokers.clone()).ok_or_else(|| {
            anyhow::anyhow!("--kafka needs brokers: --brokers HOST:PORT, kafka.brokers or STOCKFLOW__KAFKA__BROKERS")
        })?;
        Ok(Some(KafkaTarget { brokers, topic: topic.unwrap_or_else(|| section.topic.clone()) }))
    }
}

/// The error of a Kafka command in a build without the `kafka` feature.
#[cfg(not(feature = "kafka"))]
pub fn not_built() -> anyhow::Error {
    anyhow::anyhow!(
        "this stockflow was built without Kafka support: rebuild with `cargo build --release --features kafka` \
         (needs cmake, libssl-dev and libcurl4-openssl-dev; see docs/kafka.md)"
    )
}

#[cfg(feature = "kafka")]
pub use enabled::*;

#[cfg(feature = "kafka")]
mod enabled {
    use std::sync::Arc;

    use super::*;
    use crate::runtime::config::KafkaSecurity;
    use stockflow_pipeline::kafka::{KafkaConfig, Security, Signer};

    /// The pipeline's client config for `target`.
    pub fn config(section: &KafkaSection, target: &KafkaTarget) -> KafkaConfig {
        let mut cfg = KafkaConfig::new(&target.brokers, &target.topic, &section.group_id);
        cfg.session_timeout = std::time::Duration::from_millis(section.session_timeout_ms);
        cfg.security = match section.security {
            KafkaSecurity::Plaintext => Security::Plaintext,
            KafkaSecurity::Tls => Security::Tls { ca_location: section.ca_location.clone() },
            KafkaSecurity::ScramSha256 | KafkaSecurity::ScramSha512 => Security::Scram {
                mechanism: if section.security == KafkaSecurity::ScramSha256 {
                    "SCRAM-SHA-256"
                } else {
                    "SCRAM-SHA-512"
                }
                .into(),
                username: section.username.clone().unwrap_or_default(),
                password: section.password.clone().unwrap_or_default(),
            },
            KafkaSecurity::MskIam => Security::MskIam { region: region(section) },
        };
        if let (Some(ca), KafkaSecurity::ScramSha256 | KafkaSecurity::ScramSha512 | KafkaSecurity::MskIam) =
            (&section.ca_location, section.security)
        {
            cfg.properties.push(("ssl.ca.location".into(), ca.clone()));
        }
        cfg.properties.extend(section.properties.iter().map(|(k, v)| (k.clone(), v.clone())));
        cfg
    }

    fn region(section: &KafkaSection) -> String {
        section
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into())
    }

    /// The MSK IAM signer when `security = "msk-iam"`.
    pub async fn signer(section: &KafkaSection) -> anyhow::Result<Option<Arc<Signer>>> {
        if section.security != KafkaSecurity::MskIam {
            return Ok(None);
        }
        Ok(Some(Arc::new(Signer::from_env(&region(section)).await?)))
    }

    /// A producer onto the topic.
    pub async fn producer(
        section: &KafkaSection,
        target: &KafkaTarget,
    ) -> anyhow::Result<stockflow_pipeline::kafka::KafkaProducer> {
        let signer = signer(section).await?;
        Ok(stockflow_pipeline::kafka::KafkaProducer::new(&config(section, target), signer)?)
    }

    /// Creates the topic unless it exists (`[kafka] partitions`, or `shards` when 0).
    pub async fn ensure_topic(section: &KafkaSection, target: &KafkaTarget, shards: usize) -> anyhow::Result<usize> {
        let n = if section.partitions > 0 { section.partitions as i32 } else { shards.max(1) as i32 };
        let signer = signer(section).await?;
        Ok(stockflow_pipeline::kafka::ensure_topic(&config(section, target), signer, n).await?)
    }
}

/// Without the feature: the error that says how to build it.
#[cfg(not(feature = "kafka"))]
pub async fn ensure_topic(_: &KafkaSection, _: &KafkaTarget, _: usize) -> anyhow::Result<usize> {
    Err(not_built())
}

/// Fails unless this build has Kafka support.
pub fn require() -> anyhow::Result<()> {
    #[cfg(not(feature = "kafka"))]
    return Err(not_built());
    #[cfg(feature = "kafka")]
    Ok(())
}
