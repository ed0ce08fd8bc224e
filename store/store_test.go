package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/warmpool/warmpool/vm"
)

func openTemp(t *testing.T) (*Store, string) {
	t.Helper()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, dir
}

func TestRecordsSurviveReopen(t *testing.T) {
	s, dir := openTemp(t)
	exp := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	lease := Lease{ID: "l-1", Pool: "py", VMID: "vm-1", Owner: "ci", TTL: time.Minute, ExpiresAt: &exp, CreatedAt: exp.Add(-time.Minute)}
	if err := Put(s, Leases, lease); err != nil {
		t.Fatal(err)
	}
	if err := Put(s, Pools, Pool{Name: "py", Template: "base", Min: 1, Max: 3, MaxAge: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s2.Close()
	got, err := Get(s2, Leases, "l-1")
	if err != nil {
		t.Fatal(err)
	}
	if got.VMID != "vm-1" || got.Owner != "ci" || got.ExpiresAt == nil || !got.ExpiresAt.Equal(exp) || got.TTL != time.Minute {
		t.Errorf("lease after reopen = %+v", got)
	}
	p, err := Get(s2, Pools, "py")
	if err != nil || p.Max != 3 || p.MaxAge != time.Hour {
		t.Errorf("pool after reopen = %+v, %v", p, err)
	}
}

func TestGetMissingIsNotFound(t *testing.T) {
	s, _ := openTemp(t)
	_, err := Get(s, Templates, "nope")
	if !errors.Is(err, vm.ErrNotFound) || !strings.Contains(err.Error(), "nope") {
		t.Errorf("Get missing = %v, want ErrNotFound naming the key", err)
	}
	if err := Delete(s, Templates, "nope"); err != nil {
		t.Errorf("Delete missing = %v, want nil", err)
	}
}

func TestUpdateIsAllOrNothing(t *testing.T) {
	s, _ := openTemp(t)
	if err := Put(s, VMs, VM{ID: "vm-1", Role: RoleWarm, Pool: "py"}); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	err := s.Update(func(tx *Tx) error {
		if err := Leases.Put(tx, Lease{ID: "l-1", Pool: "py", VMID: "vm-1"}); err != nil {
			return err
		}
		if err := VMs.Put(tx, VM{ID: "vm-1", Role: RoleLeased, Pool: "py", Lease: "l-1"}); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Update = %v", err)
	}
	if _, err := Get(s, Leases, "l-1"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("lease written by a failed transaction: %v", err)
	}
	v, _ := Get(s, VMs, "vm-1")
	if v.Role != RoleWarm {
		t.Errorf("vm role changed by a failed transaction: %+v", v)
	}

	// The same pair committed together is seen together.
	err = s.Update(func(tx *Tx) error {
		if err := Leases.Put(tx, Lease{ID: "l-1", Pool: "py", VMID: "vm-1"}); err != nil {
			return err
		}
		return VMs.Put(tx, VM{ID: "vm-1", Role: RoleLeased, Pool: "py", Lease: "l-1"})
	})
	if err != nil {
		t.Fatal(err)
	}
	err = s.View(func(tx *Tx) error {
		l, err := Leases.Get(tx, "l-1")
		if err != nil {
			return err
		}
		v, err := VMs.Get(tx, l.VMID)
		if err != nil {
			return err
		}
		if v.Role != RoleLeased || v.Lease != "l-1" {
			return fmt.Errorf("vm = %+v", v)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

func TestListInKeyOrder(t *testing.T) {
	s, _ := openTemp(t)
	for _, n := range []string{"c", "a", "b"} {
		if err := Put(s, Templates, Template{Name: n, Generation: 1}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := List(s, Templates)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tpl := range got {
		names = append(names, tpl.Name)
	}
	if strings.Join(names, ",") != "a,b,c" {
		t.Errorf("List = %v", names)
	}
	if err := Put(s, Templates, Template{}); err == nil {
		t.Error("Put with an empty key succeeded")
	}
}

func TestConcurrentUse(t *testing.T) {
	s, _ := openTemp(t)
	const workers, each = 8, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				id := fmt.Sprintf("vm-%d-%d", w, i)
				if err := Put(s, VMs, VM{ID: id, Role: RoleWarm}); err != nil {
					errs <- err
					return
				}
				if _, err := List(s, VMs); err != nil {
					errs <- err
					return
				}
				if i%2 == 0 {
					if err := Delete(s, VMs, id); err != nil {
						errs <- err
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	got, _ := List(s, VMs)
	if want := workers * (each / 2); len(got) != want {
		t.Errorf("%d VMs left, want %d", len(got), want)
	}
}

func TestSecondOpenIsRefused(t *testing.T) {
	_, dir := openTemp(t)
	_, err := Open(dir)
	if !errors.Is(err, ErrInUse) {
		t.Errorf("second Open = %v, want ErrInUse", err)
	}
}

func TestNewerSchemaIsRefused(t *testing.T) {
	dir := t.TempDir()
	db, err := bolt.Open(filepath.Join(dir, FileName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(btx *bolt.Tx) error {
		b, err := btx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return err
		}
		return b.Put(schemaKey, []byte("99"))
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	if s, err := Open(dir); err == nil || !strings.Contains(err.Error(), "99") {
		if s != nil {
			s.Close()
		}
		t.Errorf("Open of a newer schema = %v, want an error naming it", err)
	}
}

func TestFileIsPrivate(t *testing.T) {
	s, _ := openTemp(t)
	fi, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		t.Errorf("%s has mode %v, want no group/other access", s.Path(), fi.Mode().Perm())
	}
}

func TestLeaseExpired(t *testing.T) {
	now := time.Now()
	past, future := now.Add(-time.Second), now.Add(time.Second)
	if (Lease{}).Expired(now) {
		t.Error("lease without TTL expired")
	}
	if !(Lease{ExpiresAt: &past}).Expired(now) || (Lease{ExpiresAt: &future}).Expired(now) {
		t.Error("Expired disagrees with the deadline")
	}
}

func TestObserveSeesCommittedWritesOnly(t *testing.T) {
	s, _ := openTemp(t)
	var got []Mutation
	s.Observe(func(m Mutation) { got = append(got, m) })
	if err := s.Update(func(tx *Tx) error {
		if err := Pools.Put(tx, Pool{Name: "a"}); err != nil {
			return err
		}
		return Pools.Delete(tx, "b")
	}); err != nil {
		t.Fatal(err)
	}
	_ = s.Update(func(tx *Tx) error {
		_ = Pools.Put(tx, Pool{Name: "rolled-back"})
		return errors.New("abort")
	})
	s.Observe(nil)
	if err := Put(s, Pools, Pool{Name: "unobserved"}); err != nil {
		t.Fatal(err)
	}
	want := []Mutation{{Tx: 1, Bucket: "pools", Key: "a"}, {Tx: 1, Bucket: "pools", Key: "b", Delete: true}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("observed %v, want %v", got, want)
	}
}
