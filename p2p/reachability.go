package p2p

// Reachability is what the host knows of whether other peers can dial it.
type Reachability struct {
	State   string   `json:"state"`            // "unknown", "public" or "private"
	Addrs   []string `json:"addrs"`            // addresses others should dial (public, announced or relayed)
	Reason  string   `json:"reason,omitempty"` // why not reachable: "no public address", "port closed", "symmetric NAT", ...
	Fix     string   `json:"fix,omitempty"`    // what the operator should do
	Relayed bool     `json:"relayed"`          // reachable only through a relay reservation
}

// Reachability reports the host's reachability as last determined.
func (h *Host) Reachability() Reachability { return Reachability{State: "unknown"} }
