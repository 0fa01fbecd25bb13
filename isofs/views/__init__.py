"""Who sees which view: the policy, callers resolved from /proc, `isofs exec` view groups."""
