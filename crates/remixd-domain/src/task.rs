//! Task identity, the task state machine and failure codes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A task id: the 32 lowercase hex digits of a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(uuid::Uuid);

impl TaskId {
    /// A new, time-ordered id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

/// The string is not 32 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a task id")]
pub struct BadTaskId;

impl FromStr for TaskId {
    type Err = BadTaskId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(BadTaskId);
        }
        uuid::Uuid::parse_str(s).map(Self).map_err(|_| BadTaskId)
    }
}

impl TryFrom<String> for TaskId {
    type Error = BadTaskId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> Self {
        id.to_string()
    }
}

/// Where a task is in its life. The names are the contract's.
///
/// ```text
/// waiting ──► queuing ──► generating ──► success
///    │           │            │  ▲
///    │           │            ▼  │ (worker lost, retried)
///    └───────────┴──────► fail ◄─┘
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Accepted; its input images are being fetched.
    Waiting,
    /// Inputs ready, waiting for an engine.
    Queuing,
    /// An engine is working on it.
    Generating,
    /// Finished with images.
    Success,
    /// Finished without images; `failCode`/`failMsg` say why.
    Fail,
}

impl TaskState {
    pub const ALL: [TaskState; 5] = [
        TaskState::Waiting,
        TaskState::Queuing,
        TaskState::Generating,
        TaskState::Success,
        TaskState::Fail,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Waiting => "waiting",
            TaskState::Queuing => "queuing",
            TaskState::Generating => "generating",
            TaskState::Success => "success",
            TaskState::Fail => "fail",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Success | TaskState::Fail)
    }

    /// Whether the state machine allows `self → next`.
    ///
    /// The only backwards move is `generating → queuing`, when the worker that held
    /// the task died and the task is retried.
    pub fn can_move_to(self, next: TaskState) -> bool {
        use TaskState::*;
        matches!(
            (self, next),
            (Waiting, Queuing)
                | (Waiting, Fail)
                | (Queuing, Generating)
                | (Queuing, Fail)
                | (Generating, Success)
                | (Generating, Fail)
                | (Generating, Queuing)
        )
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown task state {s:?}"))
    }
}

/// Why a task failed: the contract's `failCode` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailCode {
    /// `"422"`: bad input (an image that could not be fetched or decoded, say).
    BadInput,
    /// `"501"`: the engine could not generate.
    GenerationFailed,
    /// `"500"`: an internal error, or attempts exhausted by lost workers.
    Internal,
    /// `"408"`: deadline exceeded.
    Deadline,
    /// `"499"`: cancelled by the client (extension).
    Cancelled,
}

impl FailCode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailCode::BadInput => "422",
            FailCode::GenerationFailed => "501",
            FailCode::Internal => "500",
            FailCode::Deadline => "408",
            FailCode::Cancelled => "499",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            FailCode::BadInput,
            FailCode::GenerationFailed,
            FailCode::Internal,
            FailCode::Deadline,
            FailCode::Cancelled,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

impl fmt::Display for FailCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_are_32_lowercase_hex_and_time_ordered() {
        let a = TaskId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = TaskId::new();
        let s = a.to_string();
        assert_eq!(s.len(), 32);
        assert!(s
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(a.to_string() < b.to_string());
        assert_eq!(s.parse::<TaskId>().unwrap(), a);
    }

    #[test]
    fn ids_reject_other_forms() {
        for bad in [
            "",
            "xyz",
            "0193ABCDEF0123456789abcdef012345",
            "0193-abc",
            &"a".repeat(33),
        ] {
            assert!(bad.parse::<TaskId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn terminal_states_never_move() {
        for from in [TaskState::Success, TaskState::Fail] {
            for to in TaskState::ALL {
                assert!(!from.can_move_to(to));
            }
        }
    }

    #[test]
    fn the_only_backward_move_is_a_retry() {
        let rank = |s: TaskState| match s {
            TaskState::Waiting => 0,
            TaskState::Queuing => 1,
            TaskState::Generating => 2,
            TaskState::Success | TaskState::Fail => 3,
        };
        for from in TaskState::ALL {
            for to in TaskState::ALL {
                if from.can_move_to(to) && rank(to) < rank(from) {
                    assert_eq!((from, to), (TaskState::Generating, TaskState::Queuing));
                }
            }
        }
    }

    proptest! {
        #[test]
        fn every_walk_ends_terminal_or_stays_live(steps in proptest::collection::vec(0usize..5, 0..40)) {
            // Walk the machine choosing among allowed moves; it can never leave a terminal state.
            let mut s = TaskState::Waiting;
            for pick in steps {
                let next: Vec<_> = TaskState::ALL.into_iter().filter(|t| s.can_move_to(*t)).collect();
                if next.is_empty() {
                    prop_assert!(s.is_terminal());
                    break;
                }
                s = next[pick % next.len()];
            }
        }

        #[test]
        fn state_names_round_trip(i in 0usize..5) {
            let s = TaskState::ALL[i];
            prop_assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
        }
    }
}
