use std::time::Duration;

use herald::kafka::{KafkaAdmin, TopicCatalogue, TopicOutcome};

use crate::helpers::{stack_settings, unique_topic_prefix};

#[tokio::test]
async fn topics_create_makes_every_catalogue_topic_with_its_partitions_and_is_idempotent() {
    let mut settings = stack_settings();
    settings.kafka.topic_prefix = unique_topic_prefix();
    let catalogue = TopicCatalogue::load(&settings.kafka.topics_file).unwrap();
    let admin = KafkaAdmin::new(&settings.kafka).unwrap();

    let first = admin.create_topics(&catalogue).await.unwrap();
    let second = admin.create_topics(&catalogue).await.unwrap();

    assert_eq!(first.len(), catalogue.topics.len());
    assert!(
        first.iter().all(|(_, o)| *o == TopicOutcome::Created),
        "{first:?}"
    );
    assert!(
        second
            .iter()
            .all(|(_, o)| *o == TopicOutcome::AlreadyExisted),
        "{second:?}"
    );
    let names: Vec<String> = catalogue
        .topics
        .iter()
        .map(|t| admin.topic_name(&t.name))
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n.starts_with(&settings.kafka.topic_prefix))
    );
    let counts = admin
        .partition_counts(names, Duration::from_secs(10))
        .await
        .unwrap();
    for (spec, (name, count)) in catalogue.topics.iter().zip(counts) {
        assert_eq!(count, Some(spec.partitions as usize), "{name}");
    }
}
