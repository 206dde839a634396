// Command etcd is etcd's own server, built from its published module: the same etcdmain.Main
// the upstream etcd binary calls (go.etcd.io/etcd/v3's main.go is this one line too).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
