"""Property: whatever the model, world and context, the planner never chooses an
invalid layout, and the chosen degrees multiply to the world."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.planner import PlanError, list_hardware, load_hardware, plan, validate_layout
from toolkit.planner.model_dims import ModelDims

HARDWARE = list_hardware()


@st.composite
def model_dims(draw):
    kv = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16]))
    group = draw(st.sampled_from([1, 2, 3, 4, 7, 8]))
    head_dim = draw(st.sampled_from([32, 64, 128]))
    heads = kv * group
    return ModelDims(name="random", num_layers=draw(st.integers(1, 96)),
                     hidden_size=heads * head_dim, num_heads=heads, num_kv_heads=kv,
                     head_dim=head_dim,
                     intermediate_size=draw(st.integers(1, 4)) * heads * head_dim,
                     vocab_size=draw(st.integers(256, 200_000)),
                     max_position_embeddings=1 << 20,
                     tie_word_embeddings=draw(st.booleans()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=model_dims(), world=st.integers(1, 48),
       gpus_per_node=st.sampled_from([1, 2, 4, 8, 16]),
       context=st.integers(1, 400_000), hardware=st.sampled_from(HARDWARE),
       workload=st.sampled_from(["prefill", "decode", "auto"]))
def test_chosen_layout_is_always_valid(dims, world, gpus_per_node, context, hardware,
                                       workload):
    try:
        result = plan(dims, hardware, world, context, new_tokens=64, workload=workload,
                      gpus_per_node=gpus_per_node)
    except PlanError as err:
        assert "would fit" in str(err) or "nothing tried fits" in str(err)
        assert not any(c.valid for c in err.candidates)
        return
    chosen = result.chosen
    assert chosen.valid and chosen.reasons == []
    assert chosen.tp * chosen.ulysses * chosen.ring * chosen.pp == world
    assert validate_layout(dims, chosen.tp, chosen.ulysses, chosen.ring, chosen.pp, world,
                           gpus_per_node, hardware, context, new_tokens=64) == []
    assert chosen.cost.memory_gib_per_device <= load_hardware(hardware).memory_gib
    if chosen.pp > 1:  # PP only when no layout without it is valid
        assert not any(c.valid and c.pp == 1 for c in result.candidates)
