"""The `kubernetes` node agent: Nodes become fnplane nodes, StartPod becomes a Pod bound to
its node, and the Pod watch becomes pod events."""
