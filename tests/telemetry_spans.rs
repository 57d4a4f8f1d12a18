//! Goal: each message is handled inside a `keystead.message` span carrying entity, key,
//! message id, correlation id (propagated or generated), attempt, version, revision, outcome
//! and duration; payloads never reach the logs unless the user opts in.
//! Method: a capturing tracing layer installed once for this test binary; each test filters
//! by its own keys.

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use common::*;
use keystead::telemetry::{field, SPAN_MESSAGE};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

#[derive(Default)]
struct Fields(HashMap<String, String>);
impl Visit for Fields {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().to_string(), format!("{v:?}"));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().to_string(), v.to_string());
    }
}

/// Closed message spans, and the text of every event.
#[derive(Default)]
struct Captured {
    spans: Vec<HashMap<String, String>>,
    events: Vec<String>,
}

fn captured() -> &'static Mutex<Captured> {
    static CAPTURED: OnceLock<Mutex<Captured>> = OnceLock::new();
    CAPTURED.get_or_init(Default::default)
}

struct Capture;
impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        fields
            .0
            .insert("name".into(), attrs.metadata().name().to_string());
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(fields);
            }
        }
    }
    fn on_event(&self, event: &Event<'_>, _ctx: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        captured()
            .lock()
            .unwrap()
            .events
            .push(format!("{:?}", fields.0));
    }
    fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            if let Some(fields) = span.extensions().get::<Fields>() {
                captured().lock().unwrap().spans.push(fields.0.clone());
            }
        }
    }
}

fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::registry().with(Capture);
        tracing::subscriber::set_global_default(subscriber).expect("first and only subscriber");
    });
}

fn spans_for(key: &str) -> Vec<HashMap<String, String>> {
    let c = captured().lock().unwrap();
    c.spans
        .iter()
        .filter(|s| s.get("name").map(String::as_str) == Some(SPAN_MESSAGE))
        .filter(|s| s.get(field::KEY).map(String::as_str) == Some(key))
        .cloned()
        .collect()
}

on_each_backend_in_turn! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_span_carries_the_contract_fields() {
    install();
    // One key per engine: the captured spans are shared by the whole test binary.
    let key = format!("span-key-{}", backend().name());
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).retry(fast_retry(3)).open().unwrap();
    let e = rt.entity::<TallyEntity>(key.clone());
    e.ask(add("secret-card-4111"))
        .id("m-1")
        .correlation_id("req-7")
        .version(9)
        .await
        .unwrap();
    e.ask(TallyCmd::FlakyUntil {
        succeed_on: 2,
        tag: "x".into(),
    })
    .id("m-2")
    .await
    .unwrap();
    e.ask(add("dup")).id("m-1").await.unwrap();
    rt.shutdown().await;

    let spans = spans_for(&key);
    assert_eq!(spans.len(), 3, "{spans:?}");
    let first = spans
        .iter()
        .find(|s| s[field::MESSAGE_ID] == "m-1" && s.contains_key(field::VERSION))
        .unwrap();
    assert_eq!(first[field::ENTITY], "tally");
    assert_eq!(first[field::CORRELATION_ID], "req-7");
    assert_eq!(first[field::VERSION], "9");
    assert_eq!(first[field::ATTEMPT], "1");
    assert_eq!(first[field::REVISION], "1");
    assert_eq!(first[field::OUTCOME], "applied");
    assert!(first.contains_key(field::DURATION_US));

    let retried = spans
        .iter()
        .find(|s| s[field::MESSAGE_ID] == "m-2")
        .unwrap();
    assert_eq!(retried[field::ATTEMPT], "2");
    assert!(
        retried[field::CORRELATION_ID].starts_with("k-"),
        "generated when absent"
    );
    let dup = spans
        .iter()
        .find(|s| s[field::MESSAGE_ID] == "m-1" && s[field::OUTCOME] == "duplicate");
    assert!(dup.is_some(), "the duplicate has its own span and outcome");

    let c = captured().lock().unwrap();
    let leaked = c
        .spans
        .iter()
        .any(|s| format!("{s:?}").contains("secret-card"))
        || c.events.iter().any(|e| e.contains("secret-card"));
    assert!(!leaked, "a payload reached the logs without opt-in");
}
}

on_each_backend_in_turn! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_are_logged_only_when_asked() {
    install();
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).log_payloads(true).open().unwrap();
    rt.entity::<TallyEntity>("opt-in")
        .ask(add("visible-payload-42"))
        .await
        .unwrap();
    rt.shutdown().await;
    let c = captured().lock().unwrap();
    assert!(c.events.iter().any(|e| e.contains("visible-payload-42")));
}
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Ping;
impl keystead::Effect for Ping {
    const NAME: &'static str = "ping";
    type Origin = Pinger;
}
struct Pinger;
impl keystead::Entity for Pinger {
    const NAME: &'static str = "pinger";
    type State = u8;
    type Command = u8;
    type Reply = u8;
    type Error = TallyError;
    fn handle(_: &mut u8, c: &u8, ctx: &mut keystead::Context<'_>) -> Result<u8, TallyError> {
        ctx.effect(Ping);
        Ok(*c)
    }
}
struct Pong;
impl keystead::Executor<Ping> for Pong {
    fn execute(
        &self,
        _: &Ping,
        _: &keystead::EffectContext,
    ) -> Result<keystead::Feedback<Ping>, keystead::EffectError> {
        Ok(None)
    }
}

on_each_backend_in_turn! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effect_spans_carry_the_correlation_id_of_their_message() {
    install();
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime_builder(dir.path())
        .register::<Pinger>()
        .executor::<Ping>(Pong)
        .open()
        .unwrap();
    rt.entity::<Pinger>("p-1")
        .ask(1)
        .id("ping-1")
        .correlation_id("req-effect-42")
        .await
        .unwrap();
    rt.idle().await;
    rt.shutdown().await;
    let c = captured().lock().unwrap();
    let span = c
        .spans
        .iter()
        .find(|s| s.get("name").map(String::as_str) == Some("keystead.effect"))
        .expect("an effect span");
    assert_eq!(span["correlation_id"], "req-effect-42");
    assert_eq!(span["effect_key"], "pinger/p-1/ping-1/0");
    assert_eq!(span["status"], "done");
}
}
