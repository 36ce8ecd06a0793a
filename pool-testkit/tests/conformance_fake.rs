//! The conformance suite run against the fakes, so the suite itself is exercised without Python.

use pool_testkit::FakeTarget;

pool_testkit::conformance_suite!(FakeTarget::new());
