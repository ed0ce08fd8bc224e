// Package store keeps warmpool's durable records in one embedded bbolt file:
// templates, pool specs, leases, machines and every VM the daemon owns. A
// record is JSON under its natural key in the bucket of its kind. Several
// records change together in one transaction (Store.Update), so a crash
// leaves either the old state or the new one, never half of each: the next
// start reconciles the records with what the provider reports.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/warmpool/warmpool/vm"
)

// FileName is the name of the database file inside the state directory.
const FileName = "state.db"

// SchemaVersion is the layout of the records this code reads and writes.
// A database written by a newer version is refused rather than misread.
const SchemaVersion = 1

var (
	metaBucket = []byte("meta")
	schemaKey  = []byte("schema_version")
)

// ErrInUse means another process holds the database open (normally a second
// daemon on the same state directory).
var ErrInUse = errors.New("state database is in use by another process")

// Store is an open state database. It is safe for concurrent use.
type Store struct {
	db       *bolt.DB
	path     string
	observer atomic.Pointer[func(Mutation)]
	txSeq    atomic.Uint64
}

// Mutation is one Put or Delete made inside a transaction that committed.
type Mutation struct {
	// Tx numbers the observed transactions: mutations with equal Tx
	// committed together.
	Tx     uint64
	Bucket string
	Key    string
	Delete bool
}

// Observe makes every committed Put and Delete call fn, in order, after
// the transaction commits; nil stops it. Tests use it to count who writes
// which record.
func (s *Store) Observe(fn func(Mutation)) {
	if fn == nil {
		s.observer.Store(nil)
		return
	}
	s.observer.Store(&fn)
}

// Open opens (creating if needed) the database in stateDir. It fails with
// ErrInUse within a second when another process has it open.
func Open(stateDir string) (*Store, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory %s: %w", stateDir, err)
	}
	path := filepath.Join(stateDir, FileName)
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open %s: %w", path, ErrInUse)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	s := &Store{db: db, path: path}
	if err := s.init(); err != nil {
		db.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return s, nil
}

func (s *Store) init() error {
	return s.db.Update(func(btx *bolt.Tx) error {
		meta, err := btx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return err
		}
		if v := meta.Get(schemaKey); v != nil {
			got, err := strconv.Atoi(string(v))
			if err != nil {
				return fmt.Errorf("schema version %q is not a number", v)
			}
			if got > SchemaVersion {
				return fmt.Errorf("schema version %d is newer than this warmpool understands (%d)", got, SchemaVersion)
			}
		}
		if err := meta.Put(schemaKey, []byte(strconv.Itoa(SchemaVersion))); err != nil {
			return err
		}
		for _, name := range allBuckets {
			if _, err := btx.CreateBucketIfNotExists([]byte(name)); err != nil {
				return fmt.Errorf("create bucket %s: %w", name, err)
			}
		}
		return nil
	})
}

// Path is the database file.
func (s *Store) Path() string { return s.path }

// Close releases the database file.
func (s *Store) Close() error { return s.db.Close() }

// Tx is one transaction. It is only valid inside the function passed to
// Update or View.
type Tx struct {
	btx *bolt.Tx
	// mutations is collected only while an observer is set.
	mutations *[]Mutation
}

func (tx *Tx) note(m Mutation) {
	if tx.mutations != nil {
		*tx.mutations = append(*tx.mutations, m)
	}
}

// Update runs fn in a read-write transaction. Every change fn makes is
// committed together when fn returns nil and discarded when it returns an
// error.
func (s *Store) Update(fn func(*Tx) error) error {
	obs := s.observer.Load()
	if obs == nil {
		return s.db.Update(func(btx *bolt.Tx) error { return fn(&Tx{btx: btx}) })
	}
	var muts []Mutation
	err := s.db.Update(func(btx *bolt.Tx) error {
		muts = muts[:0]
		return fn(&Tx{btx: btx, mutations: &muts})
	})
	if err == nil {
		seq := s.txSeq.Add(1)
		for _, m := range muts {
			m.Tx = seq
			(*obs)(m)
		}
	}
	return err
}

// View runs fn in a read-only transaction that sees one consistent state.
func (s *Store) View(fn func(*Tx) error) error {
	return s.db.View(func(btx *bolt.Tx) error { return fn(&Tx{btx: btx}) })
}

// Keyed is a record that knows its key in its bucket.
type Keyed interface {
	StoreKey() string
}

// Kind is a typed bucket: records of type T stored under T's key.
type Kind[T Keyed] struct {
	bucket string
}

// Name is the bucket's name.
func (k Kind[T]) Name() string { return k.bucket }

func (k Kind[T]) b(tx *Tx) *bolt.Bucket { return tx.btx.Bucket([]byte(k.bucket)) }

// Put writes v under v.StoreKey(), replacing any record with that key.
func (k Kind[T]) Put(tx *Tx, v T) error {
	key := v.StoreKey()
	if key == "" {
		return fmt.Errorf("put %s: empty key", k.bucket)
	}
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("put %s %s: encode: %w", k.bucket, key, err)
	}
	if err := k.b(tx).Put([]byte(key), data); err != nil {
		return fmt.Errorf("put %s %s: %w", k.bucket, key, err)
	}
	tx.note(Mutation{Bucket: k.bucket, Key: key})
	return nil
}

// Get reads the record under key; a missing one is an error wrapping
// vm.ErrNotFound.
func (k Kind[T]) Get(tx *Tx, key string) (T, error) {
	var v T
	data := k.b(tx).Get([]byte(key))
	if data == nil {
		return v, fmt.Errorf("%s %q: %w", k.bucket, key, vm.ErrNotFound)
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return v, fmt.Errorf("decode %s %q: %w", k.bucket, key, err)
	}
	return v, nil
}

// Delete removes the record under key. Deleting a missing key is not an
// error, so that cleanup can be repeated after a crash.
func (k Kind[T]) Delete(tx *Tx, key string) error {
	if err := k.b(tx).Delete([]byte(key)); err != nil {
		return fmt.Errorf("delete %s %q: %w", k.bucket, key, err)
	}
	tx.note(Mutation{Bucket: k.bucket, Key: key, Delete: true})
	return nil
}

// Count is the number of records.
func (k Kind[T]) Count(tx *Tx) (int, error) {
	return k.b(tx).Stats().KeyN, nil
}

// List returns every record in key order.
func (k Kind[T]) List(tx *Tx) ([]T, error) {
	var out []T
	err := k.b(tx).ForEach(func(key, data []byte) error {
		var v T
		if err := json.Unmarshal(data, &v); err != nil {
			return fmt.Errorf("decode %s %q: %w", k.bucket, key, err)
		}
		out = append(out, v)
		return nil
	})
	return out, err
}

// Get reads one record in its own transaction.
func Get[T Keyed](s *Store, k Kind[T], key string) (T, error) {
	var v T
	err := s.View(func(tx *Tx) error {
		var err error
		v, err = k.Get(tx, key)
		return err
	})
	return v, err
}

// List reads every record of a kind in its own transaction.
func List[T Keyed](s *Store, k Kind[T]) ([]T, error) {
	var out []T
	err := s.View(func(tx *Tx) error {
		var err error
		out, err = k.List(tx)
		return err
	})
	return out, err
}

// Put writes one record in its own transaction.
func Put[T Keyed](s *Store, k Kind[T], v T) error {
	return s.Update(func(tx *Tx) error { return k.Put(tx, v) })
}

// Delete removes one record in its own transaction.
func Delete[T Keyed](s *Store, k Kind[T], key string) error {
	return s.Update(func(tx *Tx) error { return k.Delete(tx, key) })
}
