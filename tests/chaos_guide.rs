//! Goal: the test taught in `docs/testkit.md` compiles, passes, and is the one on the page.
//!
//! Method: the guide's code runs here verbatim, after a small order domain; a second test
//! reads the guide's code block and checks that every line of it appears in this file, in
//! order, so the page cannot drift from code that runs.

use keystead::{Context, Effect, Entity, Failure, FailureKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("the order is already paid")]
pub struct AlreadyPaid;

impl Failure for AlreadyPaid {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OrderState {
    pub paid_cents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OrderCmd {
    Pay { cents: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Charge {
    cents: u64,
}

impl Effect for Charge {
    const NAME: &'static str = "charge";
    type Origin = Order;
}

pub struct Order;

impl Entity for Order {
    const NAME: &'static str = "order";
    type State = OrderState;
    type Command = OrderCmd;
    type Reply = String;
    type Error = AlreadyPaid;

    fn handle(
        s: &mut OrderState,
        cmd: &OrderCmd,
        ctx: &mut Context<'_>,
    ) -> Result<String, AlreadyPaid> {
        let OrderCmd::Pay { cents } = cmd;
        if s.paid_cents > 0 {
            return Err(AlreadyPaid);
        }
        s.paid_cents = *cents;
        ctx.effect(Charge { cents: *cents });
        Ok(format!("receipt for {cents} cents"))
    }
}

// ---- From here on: the code shown in docs/testkit.md ------------------------------------
use keystead::testkit::Chaos;
use OrderCmd::Pay;

#[tokio::test(flavor = "multi_thread")]
async fn pay_charges_once_whatever_the_delivery() {
    Chaos::new(|b, ledger| b.register::<Order>().executor(ledger.executor::<Charge>()))
        .seeds(200)
        .check(|run| {
            let order = run.state::<Order>("o-1").ok_or("no order state")?;
            assert_eq!(order.state.paid_cents, 1999, "paid once, in full");
            assert_eq!(run.performed().len(), 1, "charged once");
            Ok(())
        })
        .run(|s| {
            s.ask::<Order>("o-1", Pay { cents: 1999 }).id("pay-o-1");
        })
        .await;
}
// ---- End of the code shown in docs/testkit.md -------------------------------------------

#[test]
fn the_guide_shows_the_code_of_this_file() {
    let root = env!("CARGO_MANIFEST_DIR");
    let guide = std::fs::read_to_string(format!("{root}/docs/testkit.md")).unwrap();
    let this = std::fs::read_to_string(format!("{root}/tests/chaos_guide.rs")).unwrap();
    let block: Vec<&str> = guide
        .split("```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/testkit.md has a rust code block")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let test_lines = block
        .iter()
        .skip_while(|l| !l.starts_with("#[tokio::test"))
        .count();
    assert!(
        test_lines <= 15,
        "the guide promises a test in 15 lines; it has {test_lines}"
    );
    let shown = this
        .split("// ---- From here on: the code shown in docs/testkit.md")
        .nth(1)
        .and_then(|rest| rest.split("// ---- End of the code shown").next())
        .expect("markers in this file");
    let mut lines = shown.lines().filter(|l| !l.trim().is_empty());
    let _rest_of_marker = lines.next();
    let ours: Vec<&str> = lines.collect();
    assert_eq!(
        block, ours,
        "docs/testkit.md and tests/chaos_guide.rs drifted apart"
    );
}
