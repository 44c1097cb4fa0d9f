"""What the tests share: rigs, fixtures' helpers, waiting, and the real servers tests start.

Nothing here is a test; every helper is defined once, here, and imported by the test modules."""
