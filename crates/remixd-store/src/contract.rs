//! The contract every [`Store`] implementation passes: the same assertions run against
//! SQLite here and against PostgreSQL in its own crate.

use std::sync::Arc;

use remixd_domain::{
    FailCode, ImageSize, KeyLimits, NumImages, RenderingSpeed, Seed, Strength, Style, TaskId,
    TaskInput, TaskState,
};

use crate::{
    AttemptOutcome, CreateOutcome, DeliveryState, Finish, Idempotency, KeyCap, NewKey, NewTask,
    Stage, Store,
};

/// A valid input for tests.
pub fn sample_input() -> TaskInput {
    TaskInput {
        prompt: "a cat".into(),
        image_url: "http://127.0.0.1:1/base.png".into(),
        reference_image_url: "http://127.0.0.1:1/ref.png".into(),
        reference_mask_url: None,
        style_image_urls: vec![],
        rendering_speed: RenderingSpeed::Balanced,
        style: Style::Auto,
        expand_prompt: true,
        image_size: ImageSize::Square,
        num_images: NumImages::new(1).unwrap(),
        seed: Seed::new(1).unwrap(),
        strength: Strength::new(0.8).unwrap(),
        negative_prompt: String::new(),
    }
}

/// Creates an account with `credits` and one key (optionally capped); returns (account id, key id).
pub async fn account_with_key(
    s: &dyn Store,
    name: &str,
    credits: i64,
    limits: KeyLimits,
) -> (String, String) {
    let acct = s
        .create_account(&format!("acct-{name}"), name, credits, 1)
        .await
        .unwrap();
    let key_id = format!(
        "{:016x}",
        name.bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
    );
    s.create_key(
        NewKey {
            id: key_id.clone(),
            account_name: name.into(),
            label: String::new(),
            key_hash: vec![1; 32],
            limits,
        },
        1,
    )
    .await
    .unwrap();
    (acct.id, key_id)
}

pub fn new_task(account: &str, key: &str, cost: i64, now: i64) -> NewTask {
    NewTask {
        id: TaskId::new(),
        account_id: account.into(),
        key_id: key.into(),
        model: remixd_domain::MODEL_NAME.into(),
        param: "{}".into(),
        input: sample_input(),
        callback_url: None,
        cost,
        now,
        idempotency: None,
    }
}

/// Runs every contract check against fresh stores made by `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    reservation_and_refund(&*make().await).await;
    concurrent_creates_never_overdraw(make().await).await;
    key_caps(&*make().await).await;
    queue_claims_leases_and_reaper(&*make().await).await;
    fetch_claims_are_fair(&*make().await).await;
    cross_account_reads(&*make().await).await;
    release_and_retry_delay(&*make().await).await;
    callback_outbox(&*make().await).await;
    idempotency_keys(make().await).await;
    retention_rows(&*make().await).await;
    task_list_pages(&*make().await).await;
    upload_quota(make().await).await;
    concurrent_claims_take_each_task_once(make().await).await;
}

/// Many workers claiming at once, through both stages, each under its own name: every
/// task is fetched once and generated once, and none is left behind.
pub async fn concurrent_claims_take_each_task_once(s: Arc<dyn Store>) {
    let (acct, key) = account_with_key(&*s, "claims", 1000, KeyLimits::default()).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let t = new_task(&acct, &key, 1, 10 + i);
        s.create_task(t.clone()).await.unwrap();
        ids.push(t.id);
    }
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let owner = format!("w{w}");
                let (mut fetched, mut generated) = (Vec::new(), Vec::new());
                loop {
                    if let Some(t) = s.claim_fetch(&owner, 100, 10_000, 2).await.unwrap() {
                        assert!(s.inputs_ready(&t.id, &owner, 101).await.unwrap());
                        fetched.push(t.id);
                    } else if let Some(t) =
                        s.claim(Stage::Generate, &owner, 200, 10_000).await.unwrap()
                    {
                        assert_eq!(t.lease_owner.as_deref(), Some(owner.as_str()));
                        assert!(
                            s.succeed(&t.id, &owner, "{}", 201).await.unwrap()
                                == Finish::Done { refunded: 0 }
                        );
                        generated.push(t.id);
                    } else {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                (fetched, generated)
            })
        })
        .collect();
    let (mut fetched, mut generated) = (Vec::new(), Vec::new());
    for w in workers {
        let (f, g) = w.await.unwrap();
        fetched.extend(f);
        generated.extend(g);
    }
    for list in [&mut fetched, &mut generated] {
        list.sort();
    }
    ids.sort();
    assert_eq!(fetched, ids, "each task fetched exactly once");
    assert_eq!(generated, ids, "each task generated exactly once");
    assert_eq!(
        s.count_by_state().await.unwrap(),
        vec![(TaskState::Success, 40)]
    );
}

/// An account's tasks, newest first, page after page; never another account's.
pub async fn task_list_pages(s: &dyn Store) {
    let (a, ka) = account_with_key(s, "lista", 1000, KeyLimits::default()).await;
    let (b, kb) = account_with_key(s, "listb", 1000, KeyLimits::default()).await;
    let mut mine = Vec::new();
    for i in 0..5 {
        let t = new_task(&a, &ka, 1, 100 + i);
        s.create_task(t.clone()).await.unwrap();
        mine.push(t.id);
        s.create_task(new_task(&b, &kb, 1, 100 + i)).await.unwrap();
    }
    mine.reverse(); // newest first
    let p1 = s.list_tasks(&a, None, 2).await.unwrap();
    let p2 = s.list_tasks(&a, Some(&p1[1].id), 2).await.unwrap();
    let p3 = s.list_tasks(&a, Some(&p2[1].id), 2).await.unwrap();
    let ids: Vec<_> = [p1, p2, p3.clone()].concat().iter().map(|t| t.id).collect();
    assert_eq!(ids, mine);
    assert_eq!(p3.len(), 1);
    assert!(s
        .list_tasks(&a, Some(&p3[0].id), 2)
        .await
        .unwrap()
        .is_empty());
    assert!(s.list_tasks("nobody", None, 10).await.unwrap().is_empty());
}

/// Old terminal tasks are listed first and deleted after (files before rows); live
/// tasks are never deleted; `tasks_by_ids` finds what exists.
pub async fn retention_rows(s: &dyn Store) {
    let (acct, key) = account_with_key(s, "ret", 1000, KeyLimits::default()).await;
    let old_done = new_task(&acct, &key, 10, 100);
    let old_live = new_task(&acct, &key, 10, 110);
    let new_done = new_task(&acct, &key, 10, 5_000);
    for t in [&old_done, &old_live, &new_done] {
        s.create_task(t.clone()).await.unwrap();
    }
    for t in [&old_done, &new_done] {
        s.fail(&t.id, None, FailCode::Cancelled, "x", 200)
            .await
            .unwrap();
    }
    let old = s.old_tasks(1_000, 10).await.unwrap();
    assert_eq!(
        old,
        vec![old_done.id],
        "only terminal tasks created before the cut"
    );
    // Listing deletes nothing.
    assert!(s.task(&old_done.id).await.unwrap().is_some());
    let found = s
        .tasks_by_ids(&[old_done.id, old_live.id, TaskId::new()])
        .await
        .unwrap();
    let mut ids: Vec<_> = found.iter().map(|t| t.id).collect();
    ids.sort();
    let mut want = vec![old_done.id, old_live.id];
    want.sort();
    assert_eq!(ids, want);
    // A live task is never deleted, even when asked.
    s.delete_tasks(&[old_done.id, old_live.id]).await.unwrap();
    assert!(s.task(&old_done.id).await.unwrap().is_none());
    assert!(s.task(&old_live.id).await.unwrap().is_some());
    assert!(s.old_tasks(1_000, 10).await.unwrap().is_empty());
}

pub async fn reservation_and_refund(s: &dyn Store) {
    let (acct, key) = account_with_key(s, "r", 40, KeyLimits::default()).await;
    let t1 = new_task(&acct, &key, 18, 10);
    assert_eq!(
        s.create_task(t1.clone()).await.unwrap(),
        CreateOutcome::Created { balance: 22 }
    );
    let t2 = new_task(&acct, &key, 18, 10);
    assert_eq!(
        s.create_task(t2.clone()).await.unwrap(),
        CreateOutcome::Created { balance: 4 }
    );
    let t3 = new_task(&acct, &key, 18, 10);
    assert_eq!(
        s.create_task(t3.clone()).await.unwrap(),
        CreateOutcome::InsufficientCredits { balance: 4 }
    );
    assert!(
        s.task(&t3.id).await.unwrap().is_none(),
        "a refused task is not stored"
    );

    // A failure refunds exactly once.
    assert_eq!(
        s.fail(
            &t1.id,
            None,
            FailCode::BadInput,
            "input.image_url is unreachable",
            20
        )
        .await
        .unwrap(),
        Finish::Done { refunded: 18 }
    );
    assert_eq!(
        s.fail(&t1.id, None, FailCode::BadInput, "again", 21)
            .await
            .unwrap(),
        Finish::NotOwner
    );
    assert_eq!(s.balance(&acct).await.unwrap(), 22);
    let rec = s.task(&t1.id).await.unwrap().unwrap();
    assert_eq!(rec.state, TaskState::Fail);
    assert_eq!(rec.fail_code, Some(FailCode::BadInput));
    assert_eq!(rec.credits_consumed, 0);
    assert_eq!(rec.complete_time, Some(20));

    // Success keeps the credits.
    s.inputs_ready(&t2.id, "nobody", 30).await.unwrap();
    let claimed = s.claim(Stage::Fetch, "w", 30, 1000).await.unwrap().unwrap();
    assert_eq!(claimed.id, t2.id);
    assert!(s.inputs_ready(&t2.id, "w", 31).await.unwrap());
    let g = s
        .claim(Stage::Generate, "w", 40, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g.state, TaskState::Generating);
    assert!(s.set_progress(&t2.id, "w", 50, 41).await.unwrap());
    assert!(
        !s.set_progress(&t2.id, "w", 40, 42).await.unwrap(),
        "progress never goes backwards"
    );
    assert_eq!(
        s.succeed(&t2.id, "w", "{\"resultUrls\":[]}", 60)
            .await
            .unwrap(),
        Finish::Done { refunded: 0 }
    );
    assert_eq!(
        s.fail(&t2.id, None, FailCode::Internal, "late", 61)
            .await
            .unwrap(),
        Finish::NotOwner
    );
    let rec = s.task(&t2.id).await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.progress, rec.cost_time, rec.credits_consumed),
        (TaskState::Success, 100, 20, 18)
    );
    assert_eq!(
        s.balance(&acct).await.unwrap() + s.credits_in_tasks(&acct).await.unwrap(),
        40
    );
}

pub async fn concurrent_creates_never_overdraw(s: Arc<dyn Store>) {
    let (acct, key) = account_with_key(&*s, "c", 18 * 5, KeyLimits::default()).await;
    let mut joins = Vec::new();
    for _ in 0..24 {
        let s = s.clone();
        let (acct, key) = (acct.clone(), key.clone());
        joins.push(tokio::spawn(async move {
            s.create_task(new_task(&acct, &key, 18, 5)).await.unwrap()
        }));
    }
    let mut created = 0;
    for j in joins {
        if let CreateOutcome::Created { .. } = j.await.unwrap() {
            created += 1;
        }
    }
    assert_eq!(created, 5);
    assert_eq!(s.balance(&acct).await.unwrap(), 0);
    assert_eq!(s.credits_in_tasks(&acct).await.unwrap(), 90);
}

pub async fn key_caps(s: &dyn Store) {
    let limits = KeyLimits {
        hourly: Some(30),
        daily: Some(50),
        total: Some(60),
    };
    let (acct, key) = account_with_key(s, "k", 1000, limits).await;
    let hour = 3_600_000;
    assert!(matches!(
        s.create_task(new_task(&acct, &key, 18, 0)).await.unwrap(),
        CreateOutcome::Created { .. }
    ));
    assert_eq!(
        s.create_task(new_task(&acct, &key, 18, 10)).await.unwrap(),
        CreateOutcome::KeyLimit {
            cap: KeyCap::Hourly,
            limit: 30,
            used: 18
        }
    );
    // An hour later the hourly window is free again; the daily cap is next.
    let t = new_task(&acct, &key, 18, hour + 1);
    assert!(matches!(
        s.create_task(t.clone()).await.unwrap(),
        CreateOutcome::Created { .. }
    ));
    assert!(matches!(
        s.create_task(new_task(&acct, &key, 18, 3 * hour))
            .await
            .unwrap(),
        CreateOutcome::KeyLimit {
            cap: KeyCap::Daily,
            ..
        }
    ));
    // A refunded task no longer counts against the caps.
    s.fail(&t.id, None, FailCode::GenerationFailed, "x", 3 * hour)
        .await
        .unwrap();
    assert!(matches!(
        s.create_task(new_task(&acct, &key, 18, 3 * hour))
            .await
            .unwrap(),
        CreateOutcome::Created { .. }
    ));
    // Days later only the total cap remains.
    assert!(matches!(
        s.create_task(new_task(&acct, &key, 30, 100 * hour))
            .await
            .unwrap(),
        CreateOutcome::KeyLimit {
            cap: KeyCap::Total,
            limit: 60,
            used: 36
        }
    ));
}

pub async fn queue_claims_leases_and_reaper(s: &dyn Store) {
    let (acct, key) = account_with_key(s, "q", 1000, KeyLimits::default()).await;
    let a = new_task(&acct, &key, 18, 1);
    let b = new_task(&acct, &key, 18, 2);
    s.create_task(a.clone()).await.unwrap();
    s.create_task(b.clone()).await.unwrap();

    // Oldest first; a claimed task is invisible to other claims.
    let c1 = s
        .claim(Stage::Fetch, "w1", 100, 200)
        .await
        .unwrap()
        .unwrap();
    let c2 = s
        .claim(Stage::Fetch, "w2", 100, 200)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((c1.id, c2.id), (a.id, b.id));
    assert!(s
        .claim(Stage::Fetch, "w3", 100, 200)
        .await
        .unwrap()
        .is_none());
    assert!(
        !s.inputs_ready(&a.id, "w2", 101).await.unwrap(),
        "only the lease owner moves a task"
    );
    assert!(s.inputs_ready(&a.id, "w1", 101).await.unwrap());
    assert_eq!(
        s.task(&a.id).await.unwrap().unwrap().state,
        TaskState::Queuing
    );

    // Generation: extend, then let the lease lapse and reap.
    let g = s
        .claim(Stage::Generate, "w1", 110, 300)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((g.id, g.attempts, g.upstream), (a.id, 1, None));
    // An upstream handle is written only by the lease's owner, and survives the reaper
    // so that the next claim resumes the provider's request.
    assert!(!s.set_upstream(&a.id, "w2", "{\"x\":2}", 111).await.unwrap());
    assert!(s.set_upstream(&a.id, "w1", "{\"x\":1}", 111).await.unwrap());
    assert!(
        !s.set_upstream(&b.id, "w2", "{}", 111).await.unwrap(),
        "not generating"
    );
    assert!(s.extend_lease(&a.id, "w1", 400, 200).await.unwrap());
    assert!(!s.extend_lease(&a.id, "w2", 400, 200).await.unwrap());
    let r = s.reap(350, 2).await.unwrap();
    assert_eq!(
        r.requeued,
        vec![b.id],
        "b's fetch lease (200) lapsed; a's (400) did not"
    );
    let r = s.reap(401, 2).await.unwrap();
    assert_eq!(r.requeued, vec![a.id]);
    assert_eq!(
        s.task(&a.id).await.unwrap().unwrap().state,
        TaskState::Queuing
    );
    assert!(
        !s.extend_lease(&a.id, "w1", 900, 402).await.unwrap(),
        "a reaped lease cannot be extended"
    );
    assert_eq!(
        s.succeed(&a.id, "w1", "{}", 402).await.unwrap(),
        Finish::NotOwner,
        "nor completed"
    );

    // Second attempt dies too: with max_attempts = 2 the reaper fails and refunds it.
    let g = s
        .claim(Stage::Generate, "w2", 500, 600)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((g.id, g.attempts), (a.id, 2));
    assert_eq!(g.upstream.as_deref(), Some("{\"x\":1}"));
    assert!(
        !s.set_upstream(&a.id, "w1", "{}", 501).await.unwrap(),
        "the reaped owner writes no more"
    );
    let before = s.balance(&acct).await.unwrap();
    let r = s.reap(601, 2).await.unwrap();
    assert_eq!(r.failed, vec![a.id]);
    let rec = s.task(&a.id).await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.fail_code, rec.credits_consumed),
        (TaskState::Fail, Some(FailCode::Internal), 0)
    );
    assert_eq!(s.balance(&acct).await.unwrap(), before + 18);
}

/// Fetch claims share a worker's slots between accounts: the least-served account
/// first, and never more than `per_account` of one account's tasks per owner.
pub async fn fetch_claims_are_fair(s: &dyn Store) {
    let (a, ka) = account_with_key(s, "fa", 1000, KeyLimits::default()).await;
    let (b, kb) = account_with_key(s, "fb", 1000, KeyLimits::default()).await;
    let mut a_tasks = Vec::new();
    for t in 1..=4 {
        let n = new_task(&a, &ka, 18, t);
        s.create_task(n.clone()).await.unwrap();
        a_tasks.push(n.id);
    }
    let b1 = new_task(&b, &kb, 18, 5);
    s.create_task(b1.clone()).await.unwrap();
    let claim = |owner: &'static str, now: i64| s.claim_fetch(owner, now, 1000, 2);

    // Oldest first while both accounts have nothing in flight; then B, although A's
    // second task is older, because A already holds a slot.
    assert_eq!(claim("w", 100).await.unwrap().unwrap().id, a_tasks[0]);
    assert_eq!(claim("w", 100).await.unwrap().unwrap().id, b1.id);
    assert_eq!(claim("w", 100).await.unwrap().unwrap().id, a_tasks[1]);
    // A holds its share (2) of this owner's slots: nothing more for it here...
    assert!(claim("w", 100).await.unwrap().is_none());
    // ...while another worker process has its own slots.
    assert_eq!(claim("w2", 100).await.unwrap().unwrap().id, a_tasks[2]);
    // A finished fetch frees its slot.
    assert!(s.inputs_ready(&a_tasks[0], "w", 101).await.unwrap());
    assert_eq!(claim("w", 102).await.unwrap().unwrap().id, a_tasks[3]);

    // Leases that lapsed no longer count as in flight (the reaper takes them back).
    let (c, kc) = account_with_key(s, "fc", 1000, KeyLimits::default()).await;
    let c1 = new_task(&c, &kc, 18, 6);
    let c2 = new_task(&c, &kc, 18, 7);
    let c3 = new_task(&c, &kc, 18, 8);
    for t in [&c1, &c2, &c3] {
        s.create_task(t.clone()).await.unwrap();
    }
    assert_eq!(
        s.claim_fetch("w3", 200, 300, 2).await.unwrap().unwrap().id,
        c1.id
    );
    assert_eq!(
        s.claim_fetch("w3", 200, 300, 2).await.unwrap().unwrap().id,
        c2.id
    );
    assert!(s.claim_fetch("w3", 200, 300, 2).await.unwrap().is_none());
    assert_eq!(
        s.claim_fetch("w3", 301, 900, 2).await.unwrap().unwrap().id,
        c3.id
    );

    // The plain claim orders the same way, without a cap.
    let (d, kd) = account_with_key(s, "fd", 1000, KeyLimits::default()).await;
    let (e, ke) = account_with_key(s, "fe", 1000, KeyLimits::default()).await;
    let d1 = new_task(&d, &kd, 18, 9);
    let d2 = new_task(&d, &kd, 18, 10);
    let e1 = new_task(&e, &ke, 18, 11);
    for t in [&d1, &d2, &e1] {
        s.create_task(t.clone()).await.unwrap();
    }
    let got: Vec<_> = [
        s.claim(Stage::Fetch, "w4", 400, 2000)
            .await
            .unwrap()
            .unwrap()
            .id,
        s.claim(Stage::Fetch, "w4", 400, 2000)
            .await
            .unwrap()
            .unwrap()
            .id,
        s.claim(Stage::Fetch, "w4", 400, 2000)
            .await
            .unwrap()
            .unwrap()
            .id,
    ]
    .into();
    assert_eq!(got, vec![d1.id, e1.id, d2.id]);
}

pub async fn cross_account_reads(s: &dyn Store) {
    let (a1, k1) = account_with_key(s, "x1", 100, KeyLimits::default()).await;
    let (a2, _) = account_with_key(s, "x2", 100, KeyLimits::default()).await;
    let t = new_task(&a1, &k1, 18, 1);
    s.create_task(t.clone()).await.unwrap();
    assert!(s.get_task(&t.id, &a1).await.unwrap().is_some());
    assert!(s.get_task(&t.id, &a2).await.unwrap().is_none());
    assert!(s.get_task(&TaskId::new(), &a1).await.unwrap().is_none());
}

pub async fn release_and_retry_delay(s: &dyn Store) {
    let (acct, key) = account_with_key(s, "rel", 100, KeyLimits::default()).await;
    let t = new_task(&acct, &key, 18, 1);
    s.create_task(t.clone()).await.unwrap();
    s.claim(Stage::Fetch, "w", 2, 100).await.unwrap().unwrap();
    assert!(s.inputs_ready(&t.id, "w", 3).await.unwrap());
    let g = s
        .claim(Stage::Generate, "w", 4, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g.attempts, 1);
    // Graceful shutdown: given back without spending the attempt.
    assert!(s.release(&t.id, "w", 0, false, 5).await.unwrap());
    let rec = s.task(&t.id).await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.attempts, rec.lease_owner.as_deref()),
        (TaskState::Queuing, 0, None)
    );
    // Temporarily unavailable: the attempt counts and the task waits until not_before.
    s.claim(Stage::Generate, "w", 6, 100)
        .await
        .unwrap()
        .unwrap();
    assert!(s.release(&t.id, "w", 50, true, 7).await.unwrap());
    assert!(s
        .claim(Stage::Generate, "w", 49, 100)
        .await
        .unwrap()
        .is_none());
    let g = s
        .claim(Stage::Generate, "w", 50, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g.attempts, 2);
}

pub async fn callback_outbox(s: &dyn Store) {
    let (acct, key) = account_with_key(s, "cb", 100, KeyLimits::default()).await;
    let mut with_cb = new_task(&acct, &key, 18, 1);
    with_cb.callback_url = Some("http://127.0.0.1:1/hook".into());
    let without = new_task(&acct, &key, 18, 1);
    s.create_task(with_cb.clone()).await.unwrap();
    s.create_task(without.clone()).await.unwrap();
    assert_eq!(s.balance(&acct).await.unwrap(), 64);

    // Terminal transitions record the delivery in the same transaction, after the refund.
    s.fail(&with_cb.id, None, FailCode::BadInput, "x", 10)
        .await
        .unwrap();
    s.fail(&without.id, None, FailCode::BadInput, "x", 10)
        .await
        .unwrap();
    assert!(
        s.deliveries_of(&without.id).await.unwrap().is_empty(),
        "no URL, no delivery"
    );
    let d = s.deliveries_of(&with_cb.id).await.unwrap();
    assert_eq!(d.len(), 1);
    let d = &d[0];
    assert!(d.id.starts_with("msg_"));
    assert_eq!(
        (d.state, d.remained_credits, d.attempts, d.url.as_str()),
        (DeliveryState::Pending, 82, 0, "http://127.0.0.1:1/hook")
    );

    // Claims are exclusive until the lease lapses.
    let c = s.claim_deliveries("a", 10, 100, 10).await.unwrap();
    assert_eq!(c.len(), 1);
    assert!(s
        .claim_deliveries("b", 50, 150, 10)
        .await
        .unwrap()
        .is_empty());
    let retry = AttemptOutcome::Retry {
        status: Some(500),
        error: "HTTP 500".into(),
        next_attempt: 1000,
    };
    assert!(
        !s.record_attempt(&d.id, "b", "{}", &retry, 60)
            .await
            .unwrap(),
        "only the lease owner records"
    );
    assert!(s
        .record_attempt(&d.id, "a", "{\"first\":1}", &retry, 60)
        .await
        .unwrap());
    assert!(
        s.claim_deliveries("a", 999, 2000, 10)
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );
    let c = s.claim_deliveries("b", 1000, 2000, 10).await.unwrap();
    assert_eq!(
        (c[0].attempts, c[0].payload.as_deref(), c[0].last_status),
        (1, Some("{\"first\":1}"), Some(500))
    );
    // The payload is fixed by the first attempt.
    let give_up = AttemptOutcome::GiveUp {
        status: Some(410),
        error: "gone".into(),
    };
    assert!(s
        .record_attempt(&d.id, "b", "{\"second\":2}", &give_up, 1100)
        .await
        .unwrap());
    let failed = s
        .list_deliveries(Some(DeliveryState::Failed), 10)
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0].payload.as_deref(), failed[0].attempts),
        (Some("{\"first\":1}"), 2)
    );

    // An operator redelivers: the schedule starts again, now.
    assert!(s.redeliver(&d.id, 1200).await.unwrap());
    assert!(!s.redeliver("msg_nope", 1200).await.unwrap());
    let c = s.claim_deliveries("c", 1200, 3000, 10).await.unwrap();
    assert_eq!((c.len(), c[0].attempts), (1, 0));
    // While that attempt holds its lease, a second redeliver must not clear it (two
    // attempts would run at once); once the lease has lapsed it may.
    match s.redeliver(&d.id, 1250).await {
        Err(crate::StoreError::Busy(msg)) => assert!(msg.contains("in flight"), "{msg}"),
        other => panic!("redeliver during an attempt: {other:?}"),
    }
    assert!(s
        .record_attempt(
            &d.id,
            "c",
            "{}",
            &AttemptOutcome::Delivered { status: 204 },
            1300
        )
        .await
        .unwrap());
    assert_eq!(
        s.list_deliveries(Some(DeliveryState::Delivered), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // A lapsed lease is claimable again (a deliverer died mid-attempt).
    let mut t = new_task(&acct, &key, 18, 2000);
    t.callback_url = Some("http://127.0.0.1:1/hook".into());
    s.create_task(t.clone()).await.unwrap();
    s.fail(&t.id, None, FailCode::Cancelled, "x", 2000)
        .await
        .unwrap();
    assert_eq!(
        s.claim_deliveries("dead", 2000, 2100, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.claim_deliveries("alive", 2101, 2200, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Secrets.
    assert_eq!(s.webhook_secret(&acct).await.unwrap(), None);
    s.set_webhook_secret("cb", "whsec_abc").await.unwrap();
    assert_eq!(
        s.webhook_secret(&acct).await.unwrap().as_deref(),
        Some("whsec_abc")
    );
    assert!(s.set_webhook_secret("nobody", "x").await.is_err());
}

pub async fn idempotency_keys(s: Arc<dyn Store>) {
    let (acct, key) = account_with_key(&*s, "idem", 100, KeyLimits::default()).await;
    let idem = |k: &str, h: &str| {
        Some(Idempotency {
            key: k.into(),
            body_hash: h.into(),
        })
    };
    let mut first = new_task(&acct, &key, 18, 1000);
    first.idempotency = idem("k1", "h1");
    assert!(matches!(
        s.create_task(first.clone()).await.unwrap(),
        CreateOutcome::Created { .. }
    ));
    // Same key and body: the first task, no second charge.
    let mut again = new_task(&acct, &key, 18, 2000);
    again.idempotency = idem("k1", "h1");
    assert_eq!(
        s.create_task(again.clone()).await.unwrap(),
        CreateOutcome::Existing { task_id: first.id }
    );
    assert!(s.task(&again.id).await.unwrap().is_none());
    assert_eq!(s.balance(&acct).await.unwrap(), 82);
    // Same key, other body: refused.
    let mut other = new_task(&acct, &key, 18, 3000);
    other.idempotency = idem("k1", "h2");
    assert_eq!(
        s.create_task(other).await.unwrap(),
        CreateOutcome::IdempotencyConflict
    );
    // After 24 h the key is free again.
    let mut later = new_task(&acct, &key, 18, 1000 + crate::IDEMPOTENCY_WINDOW_MS + 1);
    later.idempotency = idem("k1", "h2");
    assert!(matches!(
        s.create_task(later).await.unwrap(),
        CreateOutcome::Created { .. }
    ));
    // Under concurrency: one task, one charge.
    let mut joins = Vec::new();
    for _ in 0..12 {
        let s = s.clone();
        let mut t = new_task(&acct, &key, 18, 5000);
        t.idempotency = idem("race", "h");
        joins.push(tokio::spawn(async move { s.create_task(t).await.unwrap() }));
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for j in joins {
        match j.await.unwrap() {
            CreateOutcome::Created { .. } => created += 1,
            CreateOutcome::Existing { task_id } => {
                ids.insert(task_id);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((created, ids.len()), (1, 1));
    assert_eq!(s.balance(&acct).await.unwrap(), 100 - 18 * 3);
}

pub async fn upload_quota(s: Arc<dyn Store>) {
    let (a, _) = account_with_key(&*s, "up-a", 0, KeyLimits::default()).await;
    let (b, _) = account_with_key(&*s, "up-b", 0, KeyLimits::default()).await;
    let up = |key: &str, account: &str, size: i64, at: i64, until: i64| crate::UploadRecord {
        key: key.into(),
        account_id: account.into(),
        file_size: size,
        mime_type: "image/png".into(),
        create_time: at,
        expire_time: until,
    };
    assert_eq!(s.upload_bytes(&a, 0).await.unwrap(), 0);
    assert!(s
        .record_upload_within(&up("a1", &a, 40, 10, 1000), 100)
        .await
        .unwrap());
    assert!(s
        .record_upload_within(&up("a2", &a, 60, 20, 2000), 100)
        .await
        .unwrap());
    // Exactly at the quota passes; one byte more does not, and leaves no row.
    assert!(!s
        .record_upload_within(&up("a3", &a, 1, 30, 2000), 100)
        .await
        .unwrap());
    assert_eq!(s.upload("a3").await.unwrap(), None);
    assert_eq!(s.upload_bytes(&a, 30).await.unwrap(), 100);
    // Other accounts have their own room.
    assert!(s
        .record_upload_within(&up("b1", &b, 90, 30, 2000), 100)
        .await
        .unwrap());
    assert_eq!(s.upload_bytes(&b, 30).await.unwrap(), 90);
    // Expired uploads no longer count, whether or not the sweeper removed them yet.
    assert_eq!(s.upload_bytes(&a, 1001).await.unwrap(), 60);
    assert!(s
        .record_upload_within(&up("a4", &a, 40, 1001, 3000), 100)
        .await
        .unwrap());
    assert_eq!(s.upload_bytes(&a, 1001).await.unwrap(), 100);
    // The plain record does not look at quotas (and counts towards them).
    s.record_upload(&up("a5", &a, 500, 1002, 3000))
        .await
        .unwrap();
    assert_eq!(s.upload_bytes(&a, 1002).await.unwrap(), 600);

    // Racing for the last room: exactly as many pass as fit.
    let (c, _) = account_with_key(&*s, "up-c", 0, KeyLimits::default()).await;
    let joins: Vec<_> = (0..10)
        .map(|i| {
            let (s, c) = (s.clone(), c.clone());
            tokio::spawn(async move {
                s.record_upload_within(&up(&format!("c{i}"), &c, 30, 5, 9999), 100)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut passed = 0;
    for j in joins {
        passed += j.await.unwrap() as usize;
    }
    assert_eq!(passed, 3);
    assert_eq!(s.upload_bytes(&c, 5).await.unwrap(), 90);
}

/// A copy of task `$1`, expired in a fetch lease, under an id that is not a task id: a
/// row written behind remixd's back. Valid SQL on both stores.
pub const CORRUPT_ROW_SQL: &str =
    "INSERT INTO tasks (id, account_id, key_id, model, state, param, \
    input, cost, credits_consumed, lease_owner, lease_until, create_time, update_time) \
    SELECT 'not-a-task-id', account_id, key_id, model, 'waiting', param, input, cost, \
    credits_consumed, 'w', 20, create_time, update_time FROM tasks WHERE id = $1";

/// The reaper is not held up by a row it cannot handle: the corrupt row (written by
/// `insert_corrupt`, which runs [`CORRUPT_ROW_SQL`] with the given id on its own
/// connection) is reported and left alone, and the other expired task still goes back
/// to its queue in the same pass.
pub async fn reaper_skips_a_corrupt_row<F, Fut>(s: &dyn Store, insert_corrupt: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (acct, key) = account_with_key(s, "a", 100, Default::default()).await;
    let t = new_task(&acct, &key, 10, 1);
    s.create_task(t.clone()).await.unwrap();
    let claimed = s.claim(Stage::Fetch, "w", 10, 20).await.unwrap().unwrap();
    assert_eq!(claimed.id, t.id);
    insert_corrupt(t.id.to_string()).await;

    let r = s.reap(1_000, 3).await.expect("the pass completes");
    assert_eq!(r.requeued, vec![t.id], "the good task is requeued");
    assert_eq!(r.skipped.len(), 1, "{r:?}");
    assert_eq!(r.skipped[0].0, "not-a-task-id");
    // The good task can be claimed again at once.
    assert!(s
        .claim(Stage::Fetch, "w2", 1_001, 2_000)
        .await
        .unwrap()
        .is_some());
}
