"""Interactive sessions on the node: the terminal of an interactive job's rank 0, commands beside a
rank (exec), and TCP connections to the node's loopback (port-forward), each relayed to the
coordinator on a stream of its own (SessionRelayService/NodeRelay)."""
