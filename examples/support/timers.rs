//! Timer accuracy, shared by `examples/timers.rs` and the bench: how late delayed messages
//! are delivered when many fall due in the same second. Its includer also includes
//! `support/item.rs` as `item`.

use std::time::Duration;

use keystead::{Context, Entity, RuntimeBuilder};

use super::item::Never;

/// Records how late its one message arrived (the runtime clock's reading at apply minus
/// the message's due time, ms).
pub struct Probe;
impl Entity for Probe {
    const NAME: &'static str = "probe";
    type State = Option<u64>;
    type Command = u64;
    type Reply = ();
    type Error = Never;
    fn handle(late: &mut Option<u64>, due_ms: &u64, ctx: &mut Context<'_>) -> Result<(), Never> {
        *late = Some(ctx.now_ms().saturating_sub(*due_ms));
        Ok(())
    }
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sends `timers` delayed messages (one per entity, 64 in flight), due evenly over one
/// second starting `lead` from now, waits for all of them and returns each one's lateness
/// in ms, sorted. `lead` must leave time to send them all first.
///
/// With `plain`, no timer is used: a task per message sleeps until the due time (tokio's
/// timer) and sends a plain `tell` then, which shows what the same burst costs the path
/// from the inbox to the commit without keystead's timers.
pub async fn lateness(
    builder: RuntimeBuilder,
    timers: u64,
    lead: Duration,
    plain: bool,
) -> Result<(Vec<u64>, Duration), Error> {
    let rt = builder.register::<Probe>().open()?;
    let start = now_ms() + lead.as_millis() as u64;
    let sent = std::time::Instant::now();
    let mut sends = Vec::new();
    for i in 0..timers {
        let due = start + i * 1_000 / timers.max(1);
        let probe = rt.entity::<Probe>(format!("p-{i}"));
        if plain {
            let wait = Duration::from_millis(due.saturating_sub(now_ms()));
            let at = tokio::time::Instant::now() + wait;
            sends.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                probe.tell(due).id("probe").await.map(|_| ())
            }));
            continue;
        }
        sends.push(tokio::spawn(async move {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(due);
            probe.tell(due).id("probe").at(at).await.map(|_| ())
        }));
        if sends.len() == 64 {
            for s in sends.drain(..) {
                s.await??;
            }
        }
    }
    let accepted_in = sent.elapsed();
    if !plain && now_ms() >= start {
        return Err(format!(
            "sending {timers} timers took {accepted_in:?}, past the first due time: give more lead"
        )
        .into());
    }
    for s in sends {
        s.await??; // the plain tells, sent when due
    }
    rt.wait_until(|s| s.applied >= timers).await;
    let mut late = Vec::with_capacity(timers as usize);
    for i in 0..timers {
        let state = rt.entity::<Probe>(format!("p-{i}")).snapshot().await?.state;
        late.push(state.ok_or("a probe never arrived")?);
    }
    late.sort_unstable();
    rt.shutdown().await;
    Ok((late, accepted_in))
}
