"""The DM tree: URIs, the CSP plug-in interface, dispatch by URI prefix, command execution."""
