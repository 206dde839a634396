"""`kubectl engram`: the kubectl plugin (console script `kubectl-engram`, docs/kubectl-plugin.md).

It asks the operator for things the way a user would with `kubectl patch`, through the user's
kubeconfig; it never talks to a sidecar and never decides anything the operator decides.

* `view`: pure: MemorySpaces and node Leases in, the `status` text out;
* `intents`: pure: what each command writes (a MemorySpace spec patch, a Lease annotation),
  and the checks a user gets before the write instead of a refusal in status afterwards;
* `main`: the command line and its few API calls.
"""
