"""Configuration service providers: one module per CSP, mounted into the tree by
`agent.dmtree.tree.build_tree`."""
