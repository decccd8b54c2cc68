"""The admin channel: a UNIX socket speaking length-prefixed msgpack.

`start_admin_server(path, daemon, group)` serves it (server.py); the commands
are in commands.py, the wire format, command schema and a blocking client in
protocol.py; `vfiouser-net ctl` (vfiouser_net/ctl.py) is the operator's client.

Importing this package loads nothing: the client side (protocol, ctl) must not
pull in the datapath, which the server side needs.
"""
