"""Pass pipeline: passes compose, may add parameters, are verified, and re-export."""

import pytest
import torch
from conftest import fresh_forward
from torch.fx import GraphModule

from wsvd_passes.errors import WsvdError
from wsvd_passes.graph.graph_utils import add_tensor_attr, copy_meta, get_attr_node, remove_attr_if_unused, tensor_attr
from wsvd_passes.graph.pipeline import GraphPass, Pipeline, same_function

aten = torch.ops.aten


class FactorQueryFullRank(GraphPass):
    """Test pass: W_q = U (S V^T) at full rank, run as two linears with new parameters."""

    def transform(self, gm: GraphModule, sites) -> bool:
        for site in sites:
            q = site.q_proj
            W = tensor_attr(gm, q.weight).detach().double()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            owner = site.module_path + ".q_lowrank"
            add_tensor_attr(gm, owner + ".down", (S[:, None] * Vh).float(), parameter=True)
            add_tensor_attr(gm, owner + ".up", U.float(), parameter=True)
            down, up = get_attr_node(gm, owner + ".down", q.node), get_attr_node(gm, owner + ".up", q.node)
            with gm.graph.inserting_before(q.node):
                latent = copy_meta(gm.graph.call_function(aten.linear.default, (q.node.args[0], down)), q.node)
                out = copy_meta(gm.graph.call_function(aten.linear.default, (latent, up)), q.node, val=q.node.meta["val"])
            q.node.replace_all_uses_with(out)
            gm.graph.erase_node(q.node)
            remove_attr_if_unused(gm, q.weight)
        return True


class DropQueryRope(GraphPass):
    """Test pass that breaks the attention pattern (feeds the un-rotated query to SDPA)."""

    def transform(self, gm, sites) -> bool:
        site = sites[0]
        site.attention.replace_input_with(site.q_rope.out, site.q_rope.x)
        return True


def test_pass_adding_parameters_preserves_function_and_reexports(tmp_path):
    captured = fresh_forward("tiny-llama-gqa")
    reference = fresh_forward("tiny-llama-gqa").gm
    Pipeline([FactorQueryFullRank()])(captured)
    params = dict(captured.gm.named_parameters())
    assert any(k.endswith("q_lowrank.down") for k in params)
    assert not any(k.endswith("q_proj.weight") for k in params)
    inputs = [{"input_ids": torch.randint(0, 384, (b, s))} for b, s in [(1, 5), (3, 31), (2, 64)]]
    same_function(captured.gm, reference, inputs, atol=2e-5)

    ep = captured.reexport()
    assert any(k.endswith("q_lowrank.up") for k in ep.state_dict)
    same_function(ep.module(), reference, inputs, atol=2e-5)
    torch.export.save(ep, tmp_path / "p.pt2")
    same_function(torch.export.load(tmp_path / "p.pt2").module(), reference, inputs, atol=2e-5)


def test_verification_names_the_pass_that_broke_the_pattern():
    with pytest.raises(WsvdError, match=r"layer 0 .*no rotate-half rotary embedding"):
        Pipeline([DropQueryRope()])(fresh_forward("tiny-llama"))


def test_unverified_pipeline_lets_a_broken_graph_through():
    captured = Pipeline([DropQueryRope()], verify=False)(fresh_forward("tiny-llama"))
    assert captured.gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)


def test_pass_errors_carry_the_pass_name():
    class Refuses(GraphPass):
        def transform(self, gm, sites):
            raise WsvdError("rank 999 is above the head dim 16")

    with pytest.raises(WsvdError, match="^Refuses: rank 999 is above the head dim 16$"):
        Pipeline([Refuses()])(fresh_forward("tiny-llama"))
