"""Tools a policy can call during multi-turn rollouts: sandboxed Python and user functions."""
